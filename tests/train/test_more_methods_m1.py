"""D2O, PoFT and the autoregressive (GenARM) reward model through `jaxalign.train.train` on the
tiny model and the demo data: each tiny config runs a few steps, logs the metric it exists for
and writes a checkpoint; the trained GenARM checkpoint guides decoding; bad keys and records
are one-line errors naming them."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import cli
from jaxalign import models as M
from jaxalign.config import apply_overrides, load_config
from jaxalign.data import (
    DataError,
    get_template,
    load_tokenizer,
    make_ref_join,
    record_key,
    tokenize_example,
)
from jaxalign.data.layout import SINGLE_CACHE_FIELDS
from jaxalign.errors import ConfigError
from jaxalign.sampling import SamplingOptions, guided
from jaxalign.sampling.cli_generate import load_model
from jaxalign.train import setup, train
from jaxalign.train.cache_ref import cache_reference

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config(name, *overrides, arg="smoke=True"):
    return apply_overrides(load_config(f"{ROOT / 'configs' / name}:{arg}"), list(overrides))


def _records(workdir, split="train"):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def _steps(workdir):
    return sorted(
        int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit()
    )


# --------------------------------------------------------------------------------------------------
# GenARM: train the autoregressive reward model, then guide decoding with it.


@pytest.fixture(scope="module")
def genarm_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("genarm")
    config = _config("reward/genarm_tiny.py", "data.eval=", "data.batch_size=8")
    return workdir, train(config, workdir)


def test_genarm_reward_model_trains_and_checkpoints(genarm_run):
    workdir, _ = genarm_run
    records = _records(workdir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in records)
    # the BT accuracy and margin of r = sum_t log pi_r(y_t | x, y_<t)
    assert {"rewards/accuracy", "rewards/margin", "rewards/chosen"} <= set(records[-1])
    assert not any(k.startswith("ref") for k in records[-1])  # no reference model
    assert _steps(workdir) == [3]


def test_trained_genarm_checkpoint_guides_decoding(genarm_run):
    """Greedy GenARM decoding with the trained run as the reward model picks, at the first step,
    argmax_v [log p_base(v) + (1 / beta) log p_arm(v)] computed here from the two models."""
    workdir, _ = genarm_run
    arm_config, arm_params, tokenizer_path, _ = load_model(f"checkpoint:{workdir}")
    base_params = M.init_params(arm_config, jax.random.key(7))
    tokens = jnp.asarray([[1, 5, 9, 14, 22, 30]], jnp.int32)
    prompts = {
        "prompt_tokens": tokens,
        "prompt_segment_ids": jnp.ones_like(tokens),
        "prompt_positions": jnp.arange(6, dtype=jnp.int32)[None],
        "prompt_lengths": jnp.asarray([6], jnp.int32),
        "example_mask": jnp.ones((1,), jnp.float32),
    }
    beta = 0.5
    options = SamplingOptions(max_new_tokens=2, temperature=0.0)
    result = guided.genarm(
        (arm_config, base_params),
        [(arm_config, arm_params)],
        prompts,
        rng=jax.random.key(0),
        options=options,
        beta=beta,
    )

    def last_logps(params):
        logits = M.logits(arm_config, params, M.forward(arm_config, params, tokens))[0, -1]
        return jax.nn.log_softmax(logits.astype(jnp.float32))

    combined = last_logps(base_params) + last_logps(arm_params) / beta
    assert int(result.tokens[0, 0]) == int(jnp.argmax(combined))
    assert int(jnp.argmax(combined)) != int(jnp.argmax(last_logps(base_params)))


# --------------------------------------------------------------------------------------------------
# PoFT: the aligned model's scores cached by cache-ref, then SFT records against them.

SFT_HEAD = 48  # the first SFT records: a small file keeps the cache step quick


@pytest.fixture(scope="module")
def sft_records(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    lines = (ROOT / "data/demo/sft_train.jsonl").read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:SFT_HEAD]))
    return str(path)


def test_poft_caches_the_aligned_scores_then_trains_on_them(genarm_run, sft_records, tmp_path):
    """cache-ref with the aligned model as the reference (a soup of one) writes one `ref_logps`
    per SFT record, equal to the aligned model's own sums; a run on the cache logs PoFT's scores
    and checkpoints, holding no aligned weights."""
    aligned = f"reference.soup=('checkpoint:{genarm_run[0]}',)"
    config = _config(
        "poft/tiny.py", f"data.train={sft_records}", "data.eval=", aligned, "data.batch_size=8"
    )
    cache = tmp_path / "aligned.jsonl"
    assert cache_reference(config, str(cache)) == {sft_records: SFT_HEAD}
    header, *entries = map(json.loads, cache.read_text().splitlines())
    assert header["fields"] == ["ref_logps"] and len(entries) == SFT_HEAD
    assert set(entries[0]) == {"key", "ref_logps"}

    # the cached sums are the aligned model's: recompute the first record's by hand
    model_config, params, _, _ = load_model(f"checkpoint:{genarm_run[0]}")
    tokenizer = load_tokenizer(config.tokenizer)
    record = json.loads(pathlib.Path(sft_records).read_text().splitlines()[0])
    ids, plen, _ = tokenize_example(
        tokenizer,
        get_template("plain", tokenizer),
        [{"role": "user", "content": record["prompt"]}],
        None,
        record["completion"],
        max_len=48,
        max_prompt_len=32,
    )
    hidden = M.forward(model_config, params, jnp.asarray(ids[None, :-1]))
    logits = M.logits(model_config, params, hidden)[0]
    token_logps = jax.nn.log_softmax(logits)[jnp.arange(len(ids) - 1), ids[1:]]
    expected = float(token_logps[plen - 1 :].sum())
    by_key = {e["key"]: e["ref_logps"] for e in entries}
    np.testing.assert_allclose(by_key[record_key(record)], expected, rtol=2e-5)

    workdir = tmp_path / "run"
    cached = apply_overrides(config, [f"data.ref_logps={cache}"])
    assert not setup(cached).needs_ref  # the aligned model is not loaded
    train(cached, workdir)
    records = _records(workdir)
    assert [r["step"] for r in records] == [1, 2, 3] and all(
        np.isfinite(r["loss"]) for r in records
    )
    assert {"poft/score", "poft/aligned_score", "poft/accuracy"} <= set(records[-1])
    assert records[-1]["poft/aligned_score"] < 0
    assert _steps(workdir) == [3]


def test_poft_cache_of_pairs_is_refused_naming_it(genarm_run, tmp_path):
    pairs_cache = tmp_path / "pairs.jsonl"
    pairs_cache.write_text(
        '{"format": "jaxalign-ref-cache/1", "settings": {}}\n'
        '{"key": "k", "ref_chosen_logps": 0, "ref_rejected_logps": 0, '
        '"ref_chosen_prefix_logps": 0, "ref_rejected_prefix_logps": 0}\n'
    )
    with pytest.raises(DataError, match=r"pairs.jsonl: reference cache holds \['ref_chosen_logps'"):
        make_ref_join(str(pairs_cache), None, SINGLE_CACHE_FIELDS)


# --------------------------------------------------------------------------------------------------
# D2O: samples drawn from a checkpoint by `jaxalign generate --samples_field`, then trained on.


@pytest.fixture(scope="module")
def negatives(genarm_run, tmp_path_factory):
    """16 demo pairs with K = 2 samples each from a tiny checkpoint, through the CLI."""
    folder = tmp_path_factory.mktemp("d2o")
    pairs = folder / "pairs.jsonl"
    lines = (ROOT / "data/demo/pairs_train.jsonl").read_text().splitlines(keepends=True)
    pairs.write_text("".join(lines[:16]))
    out = folder / "negatives.jsonl"
    cli.main(
        [
            "generate",
            "--model",
            f"checkpoint:{genarm_run[0]}",
            "--prompts",
            str(pairs),
            "--out",
            str(out),
            "--n",
            "2",
            "--samples_field",
            "samples",
            "--max_new_tokens",
            "4",
            "--temperature",
            "1.0",
        ]
    )
    return pairs, out


def test_generate_samples_field_writes_each_record_with_its_samples(negatives):
    pairs, out = negatives
    got = [json.loads(x) for x in out.read_text().splitlines()]
    want = [json.loads(x) for x in pairs.read_text().splitlines()]
    assert [{k: v for k, v in g.items() if k != "samples"} for g in got] == want
    assert all(
        len(g["samples"]) == 2 and all(isinstance(s, str) for s in g["samples"]) for g in got
    )


def test_d2o_tiny_config_trains_on_sampled_negatives(negatives, tmp_path):
    _, out = negatives
    workdir = tmp_path / "run"
    config = _config("d2o/tiny.py", f"data.train={out}", "data.batch_size=8")
    run = setup(config)
    assert run.objective.batch.records == "negatives" and run.objective.batch.num_samples == 2
    batch = next(run.batches(str(out), train=False))
    assert batch["tokens"].shape[0] == 3 * 8 and batch["example_mask"].shape == (8,)
    train(config, workdir)
    records = _records(workdir)
    assert [r["step"] for r in records] == [1, 2, 3] and all(
        np.isfinite(r["loss"]) for r in records
    )
    assert {"rewards/samples", "rewards/rejected", "logps/samples", "logps/accuracy"} <= set(
        records[-1]
    )
    assert records[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-5)  # policy = reference
    assert _steps(workdir) == [3]


def test_d2o_bad_sample_count_and_bad_keys_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "negatives.jsonl"
    good = {"prompt": "What is 1+1?", "rejected": "3", "samples": ["2", "4"]}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(good | {"samples": ["2"]}) + "\n")
    config = _config("d2o/tiny.py", f"data.train={bad}", "data.skip_bad_records=False")
    with pytest.raises(
        DataError,
        match=r"negatives.jsonl line 2: field \"samples\" has 1 "
        r"responses \(expected a list of 2 responses \(data.num_samples\)\)",
    ):
        next(setup(config).batches(str(bad), train=True))
    with pytest.raises(SystemExit) as exit_:
        cli.main(
            [
                "train",
                "--config",
                str(ROOT / "configs/d2o/tiny.py"),
                "--workdir",
                str(tmp_path / "w"),
                "--config.data.num_sample=3",
            ]
        )
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and 'unknown key "data.num_sample"' in err and err.count("\n") == 1
    with pytest.raises(ConfigError, match="loss 'd2o': .*unknown hyperparameters \\['gamma'\\]"):
        setup(_with_gamma(config))


def _with_gamma(config):
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.loss.gamma = 1.0
    return c
