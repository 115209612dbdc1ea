"""GKD (the `gkd` family): the tiny config end to end, the on-policy draws, the data responses,
the objective against NumPy, and its one-line errors."""

import json
import pathlib

import jax
import numpy as np
import pytest

from jaxalign import models
from jaxalign.config import apply_overrides, load_config
from jaxalign.errors import ConfigError, DataError
from jaxalign.train import distill, setup, train
from jaxalign.train.objectives import Teacher

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE = [
    f"tokenizer={ROOT / 'data/demo/tokenizer.model'}",
    f"data.train={ROOT / 'data/demo/sft_train.jsonl'}",
    "data.eval=",
]


def _config(*overrides):
    config = load_config(f"{ROOT / 'configs/gkd/tiny.py'}:smoke=true")
    return apply_overrides(config, [*BASE, *overrides])


def test_tiny_config_runs_and_the_jsd_falls(tmp_path):
    """3 steps of configs/gkd/tiny.py (seed 0 draws data, data, on-policy responses): the
    token-mean JSD to the teacher falls, the on-policy flag is logged, a checkpoint is written."""
    train(_config("steps=3", "checkpoint.every=3"), tmp_path)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    rows = [r for r in rows if r["split"] == "train"]
    jsd = [r["distill/jsd"] for r in rows]
    assert all(np.isfinite(jsd)) and jsd[-1] < 0.8 * jsd[0], jsd
    assert [r["distill/on_policy"] for r in rows] == [0.0, 0.0, 1.0]
    assert (tmp_path / "checkpoints" / "3").is_dir()


def test_on_policy_draws_are_the_lmbda_fraction():
    for lmbda in (0.0, 0.3, 1.0):
        drawn = np.mean([distill.on_policy(7, step, lmbda) for step in range(4000)])
        assert abs(drawn - lmbda) < 0.025, (lmbda, drawn)
    assert distill.on_policy(7, 11, 0.5) == distill.on_policy(7, 11, 0.5)  # resume repeats it


def test_data_responses_are_the_completions_and_lmbda_one_samples():
    """Off-policy steps answer with the records' completions (+ EOS), n copies per prompt."""
    run = setup(_config("distill.lmbda=0.0", "rl.group_size=2", "data.batch_size=4"))
    prompts = next(iter(run.batches(run.config.data.train, train=True)))
    options = distill_options(run)
    result = distill.data_responses(run, prompts, options, step=0)
    for row, record in enumerate(np.repeat(prompts["records"], 2)):
        ids = result.tokens[row, : result.lengths[row]]
        assert ids[-1] == run.tokenizer.eos_id
        assert run.tokenizer.decode(ids[:-1].tolist()).strip() == record["completion"]
    np.testing.assert_array_equal(result.prompt_index, np.repeat(np.arange(4), 2))
    run = setup(_config("distill.lmbda=1.0"))
    assert distill.data_responses(run, prompts, options, step=0) is None


def distill_options(run):
    from jaxalign.train.online import sampling_options

    return sampling_options(run)


def test_objective_is_the_token_mean_jsd_of_numpy():
    """The gkd objective's loss / weight on a rollout-layout batch equals the mask-weighted mean
    of JSD_b computed in float64 NumPy from the two models' full logits (teacher of another
    width); padding rows (example_mask 0) and prompt tokens do not count."""
    student = models.get_preset("tiny-64").replace(n_layers=1)  # one layer: compiles faster
    teacher_config = student.replace(d_model=48, n_heads=3, n_kv_heads=1, d_ff=96)
    init = jax.jit(models.init_params, static_argnums=0)
    params, t_params = init(student, jax.random.key(0)), init(teacher_config, jax.random.key(1))
    rng = np.random.default_rng(0)
    R, T = 3, 7
    tokens = rng.integers(0, student.vocab_size, (R, T + 1)).astype(np.int32)
    micro = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.tile(np.arange(T, dtype=np.int32), (R, 1)),
        "segment_ids": np.ones((R, T), np.int32),
        "loss_mask": (np.arange(T)[None, :] >= [[2], [3], [1]]).astype(np.float32),
        "example_mask": np.array([1.0, 1.0, 0.0], np.float32),
    }
    beta, tau = 0.3, 1.5
    fn = distill.gkd_objective(student, Teacher(teacher_config, ""), beta=beta, temperature=tau).fn
    loss_sum, weight, _ = jax.jit(fn)(params, t_params, micro)

    def log_softmax(mc, p):
        forward = jax.jit(models.forward, static_argnums=0)
        h = forward(mc, p, micro["tokens"], micro["positions"], micro["segment_ids"])
        z = np.asarray(h, np.float64) @ np.asarray(models.unembedding(mc, p), np.float64) / tau
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    ls, lt = log_softmax(student, params), log_softmax(teacher_config, t_params)
    m = beta * np.exp(lt) + (1 - beta) * np.exp(ls)
    jsd = beta * (np.exp(lt) * (lt - np.log(m))).sum(-1)
    jsd += (1 - beta) * (np.exp(ls) * (ls - np.log(m))).sum(-1)
    mask = micro["loss_mask"] * micro["example_mask"][:, None]
    want = (jsd * mask).sum() / mask.sum()
    # float32 sums of 512 terms ~1e-3 each: absolute error ~1e-7 (as in test_jsd.py's 2e-6)
    np.testing.assert_allclose(float(loss_sum / weight), want, rtol=0, atol=1e-6)
    assert float(weight) == mask.sum()


@pytest.mark.parametrize(
    "override,message",
    [
        ("distill.teacher=preset:nope", 'distill.teacher="preset:nope": unknown preset'),
        ("distill.teacher=runs/x", 'distill.teacher="runs/x": expected "preset:NAME"'),
        ("distill.teacher=preset:tiny-gemma2", "soft-caps its logits"),
        ("distill.beta=1.5", "distill.beta=1.5: expected 0 <= beta <= 1"),
        ("distill.lmbda=-0.1", "distill.lmbda=-0.1: expected a fraction"),
        ("distill.temperature=0.0", "distill.temperature=0.0: expected > 0"),
        ("lora.rank=4", "lora.rank=4: gkd holds the teacher"),
        ("distill.teecher=x", 'unknown key "distill.teecher" \\(did you mean "distill.teacher"'),
    ],
)
def test_bad_config_is_one_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        setup(_config(override), read_files=False)


def test_a_record_without_completion_is_a_data_error(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "What is 1+1?", "completion": "2"}\n{"prompt": "What is 2+2?"}\n')
    run = setup(_config(f"data.train={path}"))
    with pytest.raises(DataError, match=f'{path} line 2: field "completion" is missing'):
        run.batches(str(path), train=True)
