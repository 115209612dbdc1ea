"""CUT, ASFT, AFT and Re-Align end to end: each tiny config runs a few real steps through
`jaxalign.train.train` (finite loss, the method's own metric, a checkpoint), and bad keys or
records fail as one-line errors naming them."""

import json
import pathlib

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from jaxalign import losses, models
from jaxalign.config import apply_overrides, load_config
from jaxalign.data import (
    DataError,
    load_tokenizer,
    make_contrast_pipeline,
    make_judgment_pipeline,
)
from jaxalign.data.formats import JUDGMENT_PREFIX, encode_prompt
from jaxalign.data.templates import get_template
from jaxalign.errors import ConfigError
from jaxalign.train import objectives, setup, train

ROOT = pathlib.Path(__file__).resolve().parents[2]
JUDGMENTS = ROOT / "data/demo/judgments_train.jsonl"


def _config(name, *overrides):
    config = load_config(f"{ROOT / 'configs' / name}:smoke=True")
    return apply_overrides(config, ["data.eval=", "data.batch_size=8", *overrides])


def _checkpoints(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_asft_smoke_is_reference_free(tmp_path):
    config = _config("asft/tiny.py")
    assert not setup(config, read_files=False).needs_ref
    result = train(config, tmp_path)
    metrics = result["train"]
    assert np.isfinite(metrics["loss"])
    assert {"asft/logodds_chosen", "asft/logodds_rejected", "nll/chosen"} <= set(metrics)
    assert _checkpoints(tmp_path)[-1] == 4


def test_asft_unknown_hyperparameter_is_a_config_error(tmp_path):
    config = _config("asft/tiny.py")
    with config.unlocked():
        config.loss.beta = 0.1
    with pytest.raises(ConfigError, match=r"loss 'asft'.*unknown hyperparameters \['beta'\]"):
        train(config, tmp_path)


# --------------------------------------------------------------------------------------------------
# CUT


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _judgment_batch(path, **kw):
    tokenizer = load_tokenizer(str(ROOT / "data/demo/tokenizer.model"))
    options = dict(batch_size=4, max_len=48, max_prompt_len=40, shuffle=False)
    return tokenizer, next(make_judgment_pipeline(str(path), tokenizer, **options | kw))


def test_judgment_batch_reads_the_response_after_both_prompts():
    """Sequence i: the response after the prompt; E + i: the same response tokens after the
    prompt with "\\n\\nJudgment: ..." appended (the documented insertion point)."""
    tokenizer, batch = _judgment_batch(JUDGMENTS)
    records = [json.loads(x) for x in JUDGMENTS.read_text().splitlines()[:4]]
    for i, rec in enumerate(records):
        plain, judged = batch["loss_mask"][i] > 0, batch["loss_mask"][4 + i] > 0
        np.testing.assert_array_equal(batch["targets"][i][plain], batch["targets"][4 + i][judged])
        judged_prompt = [
            {"role": "user", "content": rec["prompt"] + JUDGMENT_PREFIX + rec["judgment"]}
        ]
        expected = encode_prompt(
            tokenizer, get_template("plain"), judged_prompt, None, max_prompt_len=40
        )
        np.testing.assert_array_equal(batch["tokens"][4 + i][: len(expected)], expected)
        assert np.argmax(judged) == len(expected) - 1  # the response starts right after it
        plain_prompt = encode_prompt(
            tokenizer,
            get_template("plain"),
            [{"role": "user", "content": rec["prompt"]}],
            None,
            max_prompt_len=40,
        )
        np.testing.assert_array_equal(batch["tokens"][i][: len(plain_prompt)], plain_prompt)
        assert np.argmax(plain) == len(plain_prompt) - 1


def test_judgment_objective_matches_numpy_from_full_logits():
    """The objective's CUT loss (one forward, responses aligned by position) against NumPy on
    full float64 logits of each row, padded and packed rows alike."""
    model_config = models.PRESETS["tiny-64"]
    params = models.init_params(model_config, jax.random.key(0))
    params = jax.tree.map(lambda x: x * 40.0 if x.ndim == 2 and x.shape[-1] == 512 else x, params)
    loss = losses.bind("cut", threshold=1.1, unlikelihood_weight=0.7)
    objective = objectives.judgment_objective(model_config, loss)
    _, batch = _judgment_batch(JUDGMENTS)
    hidden = models.forward(
        model_config, params, batch["tokens"], batch["positions"], batch["segment_ids"]
    )
    logits = np.asarray(hidden, np.float64) @ np.asarray(
        models.unembedding(model_config, params), np.float64
    )
    token = np.take_along_axis(_log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    total, count, flagged = 0.0, 0.0, 0.0
    for i in range(4):
        lp = token[i][batch["loss_mask"][i] > 0]
        lj = token[4 + i][batch["loss_mask"][4 + i] > 0]
        assert np.abs((lj - lp) - np.log(1.1)).min() > 1e-3  # no flag on a knife edge
        flag = lj - lp > np.log(1.1)
        total += np.where(flag, -0.7 * np.log1p(-np.exp(lp)), -lp).sum()
        count += len(lp)
        flagged += flag.sum()
    assert 0 < flagged < count  # both branches are exercised
    for kind, b in (
        ("padded", batch),
        ("packed", _judgment_batch(JUDGMENTS, pack=True, pack_rows=8)[1]),
    ):
        loss_sum, weight, metrics = jax.jit(objective.fn)(params, None, b)
        np.testing.assert_allclose(float(loss_sum / weight), total / count, rtol=2e-5, err_msg=kind)
        np.testing.assert_allclose(
            float(metrics["cut/flagged"] / weight), flagged / count, rtol=1e-6
        )


def test_cut_smoke(tmp_path):
    config = _config("cut/tiny.py")
    run = setup(config, read_files=False)
    assert not run.needs_ref and run.objective.batch.records == "judgment"
    result = train(config, tmp_path)
    metrics = result["train"]
    assert np.isfinite(metrics["loss"])
    assert 0.0 <= metrics["cut/flagged"] <= 1.0 and np.isfinite(metrics["nll/judged"])
    assert _checkpoints(tmp_path)[-1] == 4


def test_cut_errors_name_the_record_and_the_key(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "What is 1+1?", "response": "2", "judgment": "correct."}\n'
        '{"prompt": "What is 1+2?", "response": "3"}\n'
    )
    with pytest.raises(DataError, match=r'bad.jsonl line 2: field "judgment" is missing'):
        _judgment_batch(bad)
    config = _config("cut/tiny.py")
    with config.unlocked():
        config.loss = ConfigDict({"name": "dpo", "beta": 0.1})
    with pytest.raises(
        ConfigError, match=r"loss: judgment batches supply .*\(use the `cut` loss\)"
    ):
        setup(config, read_files=False)


# --------------------------------------------------------------------------------------------------
# Re-Align

CONTRASTS = ROOT / "data/demo/contrast_train.jsonl"


def _sequence_logps(model_config, params, batch):
    """float64 NumPy sums of response-token log-probs per row, from full logits."""
    hidden = models.forward(
        model_config, params, batch["tokens"], batch["positions"], batch["segment_ids"]
    )
    logits = np.asarray(hidden, np.float64) @ np.asarray(
        models.unembedding(model_config, params), np.float64
    )
    token = np.take_along_axis(_log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    return (token * batch["loss_mask"]).sum(-1)


def test_contrast_objective_matches_numpy_dpo_plus_realign():
    """Rows: chosen | x, rejected | x, chosen | x' (the record's contrast_prompt); the mix
    dpo + realign against NumPy sums of full float64 logits, with a reference of its own."""
    model_config = models.PRESETS["tiny-64"]
    params = models.init_params(model_config, jax.random.key(0))
    ref_params = models.init_params(model_config, jax.random.key(1))
    tokenizer = load_tokenizer(str(ROOT / "data/demo/tokenizer.model"))
    options = dict(batch_size=4, max_len=48, max_prompt_len=32, shuffle=False)
    batch = next(make_contrast_pipeline(str(CONTRASTS), tokenizer, **options))
    records = [json.loads(x) for x in CONTRASTS.read_text().splitlines()[:4]]
    for i, rec in enumerate(records):  # the contrast row: chosen tokens after the other prompt
        plain, other = batch["loss_mask"][i] > 0, batch["loss_mask"][8 + i] > 0
        np.testing.assert_array_equal(batch["targets"][i][plain], batch["targets"][8 + i][other])
        assert rec["contrast_prompt"] != rec["prompt"]
    loss = losses.mix([("dpo", 1.0, {"beta": 0.5}), ("realign", 0.7, {"beta": 0.3})])
    objective = objectives.paired_objective(model_config, loss)
    assert objective.batch.records == "contrast" and objective.needs_ref
    pol, ref = (
        _sequence_logps(model_config, params, batch),
        _sequence_logps(model_config, ref_params, batch),
    )
    s = (pol - ref).reshape(3, 4)  # chosen, rejected, contrast
    # -logsig(z) = log(1 + exp(-z))
    expected = np.logaddexp(0, -0.5 * (s[0] - s[1])) + 0.7 * np.logaddexp(0, -0.3 * (s[0] - s[2]))
    loss_sum, weight, metrics = jax.jit(objective.fn)(params, ref_params, batch)
    np.testing.assert_allclose(float(loss_sum / weight), expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        float(metrics["realign/realign/margin"] / weight), (0.3 * (s[0] - s[2])).mean(), rtol=1e-4
    )


def test_realign_smoke(tmp_path):
    config = _config("realign/tiny.py")
    result = train(config, tmp_path)
    metrics = result["train"]
    assert np.isfinite(metrics["loss"])
    assert {"realign/realign/accuracy", "realign/realign/margin", "dpo/rewards/margin"} <= set(
        metrics
    )
    assert _checkpoints(tmp_path)[-1] == 4


def test_realign_errors_name_the_record_and_the_key(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What is 1+1?", "chosen": "2", "rejected": "3"}\n')
    tokenizer = load_tokenizer(str(ROOT / "data/demo/tokenizer.model"))
    with pytest.raises(DataError, match=r'bad.jsonl line 1: field "contrast_prompt" is missing'):
        next(make_contrast_pipeline(str(bad), tokenizer, batch_size=1, max_len=48))
    config = _config("realign/tiny.py", "data.ref_logps=/tmp/ref.jsonl")
    with pytest.raises(ConfigError, match=r"loss: the contrast term .* no cached reference"):
        setup(config, read_files=False)
