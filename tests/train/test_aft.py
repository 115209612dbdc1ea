"""AFT end to end: ranked records {prompt, correct: [P], incorrect: [N]} -> (P + N) E sequences
per batch -> the paired objective feeding `jaxalign.losses.aft` per-sequence sums and lengths
(checked against NumPy on full float64 logits), the tiny config through `jaxalign.train.train`,
and bad records / keys as one-line errors naming them."""

import json
import pathlib

import jax
import numpy as np
import pytest

from jaxalign import losses, models
from jaxalign.config import apply_overrides, load_config
from jaxalign.data import DataError, load_tokenizer, make_ranked_pipeline
from jaxalign.errors import ConfigError
from jaxalign.train import objectives, setup, train
from jaxalign.train.cache_ref import cache_reference

ROOT = pathlib.Path(__file__).resolve().parents[2]
RANKED = ROOT / "data/demo/aft_train.jsonl"
TOKENIZER = str(ROOT / "data/demo/tokenizer.model")
E, P, N = 3, 2, 2


def _batch(path=RANKED, num_correct=P, num_incorrect=N, **kw):
    options = dict(batch_size=E, max_len=32, max_prompt_len=16, shuffle=False)
    pipeline = make_ranked_pipeline(
        str(path),
        load_tokenizer(TOKENIZER),
        num_correct=num_correct,
        num_incorrect=num_incorrect,
        **options | kw,
    )
    return next(pipeline)


def test_ranked_batch_puts_response_k_of_example_i_in_sequence_kE_plus_i():
    tokenizer = load_tokenizer(TOKENIZER)
    batch = _batch()
    assert batch["tokens"].shape[0] == (P + N) * E and batch["example_mask"].tolist() == [1] * E
    records = [json.loads(x) for x in RANKED.read_text().splitlines()[:E]]
    for i, rec in enumerate(records):
        for k, text in enumerate(rec["correct"] + rec["incorrect"]):
            row = k * E + i
            response = batch["targets"][row][batch["loss_mask"][row] > 0]
            assert response[-1] == tokenizer.eos_id
            assert tokenizer.decode(response[:-1].tolist()) == text
            assert np.all(batch["seq_index"][row][batch["segment_ids"][row] > 0] == row)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _sequence_logps(model_config, params, batch):
    """float64 NumPy sums of response-token log-probs per (padded) row, from full logits."""
    hidden = models.forward(
        model_config, params, batch["tokens"], batch["positions"], batch["segment_ids"]
    )
    logits = np.asarray(hidden, np.float64) @ np.asarray(
        models.unembedding(model_config, params), np.float64
    )
    token = np.take_along_axis(_log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    return (token * batch["loss_mask"]).sum(-1)


def test_ranked_objective_matches_numpy_aft_from_full_logits():
    """Policy and reference (other weights) sums of every correct / incorrect chain, length-
    normalised, into the AFT formula written out in NumPy; padded and packed batches alike."""
    model_config = models.PRESETS["tiny-64"]
    params, ref_params = (
        jax.tree.map(  # larger logits, so chains differ by more than the margin
            lambda x: x * 40.0 if x.ndim == 2 and x.shape[-1] == 512 else x,
            models.init_params(model_config, jax.random.key(seed)),
        )
        for seed in (0, 1)
    )
    margin, b = 0.3, 2.0
    objective = objectives.paired_objective(
        model_config,
        losses.bind("aft", margin=margin, boundary_weight=b),
        num_correct=P,
        num_incorrect=N,
    )
    assert objective.needs_ref and objective.batch.records == "ranked"
    assert objective.batch.sequences_per_example == P + N
    batch = _batch()
    lengths = batch["loss_mask"].sum(-1).reshape(P + N, E).T  # [E, P + N]
    pol = _sequence_logps(model_config, params, batch).reshape(P + N, E).T / lengths
    ref = _sequence_logps(model_config, ref_params, batch).reshape(P + N, E).T / lengths
    pos, neg, ref_neg = pol[:, :P], pol[:, P:], ref[:, P:]
    gaps = (neg[:, None, :] - pos[:, :, None]).reshape(E, -1)
    ranking = np.log1p(np.exp(gaps).sum(-1))
    hinge = ref_neg - margin - neg
    assert 0 < (hinge > 0).sum() < hinge.size  # both sides of the hinge are exercised
    boundary = np.maximum(0.0, hinge).mean(-1)
    expected = (ranking + b * boundary).mean()
    for kind, bt in (("padded", batch), ("packed", _batch(pack=True, pack_rows=8))):
        loss_sum, weight, metrics = jax.jit(objective.fn)(params, ref_params, bt)
        assert float(weight) == E
        np.testing.assert_allclose(float(loss_sum / weight), expected, rtol=1e-5, err_msg=kind)
        np.testing.assert_allclose(
            float(metrics["aft/boundary"] / weight), boundary.mean(), rtol=1e-5, err_msg=kind
        )
        np.testing.assert_allclose(
            float(metrics["aft/accuracy"] / weight), (gaps < 0).mean(), rtol=1e-6, err_msg=kind
        )


def _config(*overrides):
    config = load_config(f"{ROOT / 'configs/aft/tiny.py'}:smoke=True")
    return apply_overrides(config, list(overrides))


def test_aft_smoke(tmp_path):
    config = _config()
    run = setup(config, read_files=False)
    assert run.needs_ref and run.objective.batch.records == "ranked"
    result = train(config, tmp_path)
    metrics = result["train"]
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert np.isfinite(metrics["aft/ranking"]) and 0.0 <= metrics["aft/accuracy"] <= 1.0
    assert {"aft/boundary", "aft/positive", "aft/negative"} <= set(metrics)
    assert (tmp_path / "checkpoints" / "3").is_dir()


def test_bad_ranked_records_name_the_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = {"prompt": "What is 1+1?", "correct": ["2", "2."], "incorrect": ["3", "1"]}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(good | {"incorrect": ["3"]}) + "\n")
    with pytest.raises(
        DataError,
        match=r'bad.jsonl line 2: field "incorrect" has 1 responses.*'
        r"a list of 2 responses \(data.num_incorrect\)",
    ):
        _batch(bad, batch_size=2)
    bad.write_text(json.dumps({"prompt": "What is 1+1?", "correct": ["2", "2."]}) + "\n")
    with pytest.raises(DataError, match=r'bad.jsonl line 1: field "incorrect" is missing'):
        _batch(bad, batch_size=1)
    bad.write_text(json.dumps(good | {"correct": "2"}) + "\n")
    with pytest.raises(DataError, match=r'bad.jsonl line 1: field "correct" has str'):
        _batch(bad, batch_size=1)


def test_bad_aft_config_keys_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"loss: data.num_correct=0, data.num_incorrect=2"):
        setup(_config("data.num_correct=0"), read_files=False)
    with pytest.raises(ConfigError, match=r"loss: ranked records \(AFT\) have no reference cache"):
        setup(_config("data.ref_logps=/tmp/ref.jsonl"), read_files=False)
    with pytest.raises(ConfigError, match=r"cache-ref: ranked records .* no reference cache"):
        cache_reference(_config(), str(tmp_path / "ref.jsonl"))
    config = _config()
    with config.unlocked():
        config.loss.beta = 0.1
    with pytest.raises(ConfigError, match=r"loss 'aft'.*unknown hyperparameters \['beta'\]"):
        setup(config, read_files=False)
