"""Best-of-N under a multi-objective reward model's v . r (DPA): the kept sample is the argmax of
r_v computed independently (one unpadded forward per sample, the head and the unit direction in
float64 NumPy); `jaxalign generate --best_of N --reward_model DIR --direction ...`; wrong
directions are named ConfigErrors."""

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

from jaxalign import cli
from jaxalign import models as M
from jaxalign.checkpoint import manager as ckpt
from jaxalign.config import apply_overrides, load_config, to_dict
from jaxalign.data import load_tokenizer, make_prompt_pipeline
from jaxalign.errors import ConfigError
from jaxalign.models import heads
from jaxalign.sampling import SamplingOptions, generate
from jaxalign.sampling.best_of_n import best_of_n, reward_model
from jaxalign.sampling.cli_generate import load_model
from jaxalign.train.reward import load_reward_model
from jaxalign.train.workdir import CONFIG_FILE

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOKENIZER = str(ROOT / "data/demo/tokenizer.model")
PROMPTS = ROOT / "data/demo/prompts_eval.jsonl"
N, STEPS, V = 4, 6, (0.6, 0.8)


def _save_run(workdir, config, params):
    model_config = M.get_preset(config.model.preset)
    manager = ckpt.make_manager(workdir, async_save=False)
    record = to_dict(config) | {"model_config": dataclasses.asdict(model_config)}
    ckpt.save(manager, 0, {"step": np.int32(0), "params": params}, {"next_index": 0}, record)
    manager.close()
    (workdir / CONFIG_FILE).write_text(json.dumps(to_dict(config)))
    return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A policy run and a 2-objective reward model run (random head, so scores differ), written
    without training."""
    policy = load_config(f"{ROOT / 'configs/sft/tiny.py'}:smoke=True")
    policy = apply_overrides(policy, [f"tokenizer={TOKENIZER}"])
    model_config = M.get_preset(policy.model.preset)
    policy_dir = _save_run(
        tmp_path_factory.mktemp("policy"), policy, M.init_params(model_config, jax.random.key(0))
    )
    rm = load_config(f"{ROOT / 'configs/reward/multi_objective_tiny.py'}:smoke=True")
    rm = apply_overrides(rm, [f"tokenizer={TOKENIZER}"])
    params = M.init_params(model_config, jax.random.key(1))
    k1, k2 = jax.random.split(jax.random.key(2))
    params[heads.REWARD_HEAD] = {
        "kernel": jax.random.normal(k1, (model_config.d_model, 2)),
        "bias": jax.random.normal(k2, (2,)),
    }
    rm_dir = _save_run(tmp_path_factory.mktemp("morm"), rm, params)
    return policy_dir, rm_dir


def _reference_scores(rm_config, rm_params, batch, result, direction):
    """r_v of every row: prompt + completion right-padded (the rollout rows are left-padded), one
    forward; the hidden state of the input whose target is the last completion token; head and
    unit v in float64."""
    W = np.asarray(rm_params[heads.REWARD_HEAD]["kernel"], np.float64)
    b = np.asarray(rm_params[heads.REWARD_HEAD]["bias"], np.float64)
    v = np.asarray(direction, np.float64) / np.linalg.norm(direction)
    tokens, lengths = np.asarray(batch["prompt_tokens"]), np.asarray(batch["prompt_lengths"])
    seqs = []
    for r, i in enumerate(result.prompt_index.tolist()):
        prompt = tokens[i, tokens.shape[1] - lengths[i] :]
        seqs.append(np.concatenate([prompt, np.asarray(result.tokens[r, : result.lengths[r]])]))
    L = max(len(x) for x in seqs) - 1
    inputs = np.zeros((len(seqs), L), np.int32)
    segments = np.zeros((len(seqs), L), np.int32)
    for r, x in enumerate(seqs):
        inputs[r, : len(x) - 1], segments[r, : len(x) - 1] = x[:-1], 1
    positions = np.broadcast_to(np.arange(L), inputs.shape)
    hidden = M.forward(rm_config, heads.decoder_params(rm_params), inputs, positions, segments)
    last = np.asarray([len(x) - 2 for x in seqs])
    h = np.asarray(hidden, np.float64)[np.arange(len(seqs)), last]
    return (h @ W + b) @ v


def _batch(tokenizer, n_prompts=3):
    pipeline = make_prompt_pipeline(
        str(PROMPTS), tokenizer, batch_size=n_prompts, max_prompt_len=64, shuffle=False,
        num_epochs=1, template="plain",
    )  # fmt: skip
    return next(iter(pipeline))


def test_kept_sample_is_the_argmax_of_v_dot_r(runs):
    policy_dir, rm_dir = runs
    config, params, _, _ = load_model(f"checkpoint:{policy_dir}")
    rm_config, rm_params = load_reward_model(rm_dir)
    tokenizer = load_tokenizer(TOKENIZER)
    batch = _batch(tokenizer)
    options = SamplingOptions(
        max_new_tokens=STEPS, n=N, temperature=1.5, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id
    )
    kw = dict(rng=jax.random.key(3), options=options, tokenizer=tokenizer)
    for worst in (False, True):
        kept = best_of_n(
            config, params, batch, reward=reward_model(rm_config, rm_params, V), worst=worst, **kw
        )
        every = generate(config, params, batch, **kw)  # the same N samples, all of them
        ref = _reference_scores(rm_config, rm_params, batch, every, V).reshape(-1, N)
        np.testing.assert_allclose(kept.scores, ref, rtol=1e-4, atol=1e-4)
        want = ref.argmin(axis=1) if worst else ref.argmax(axis=1)
        np.testing.assert_array_equal(kept.sample, want)
        assert list(kept.result.text) == [every.text[i * N + s] for i, s in enumerate(want)]
        assert len(set(np.round(ref[0], 4))) > 1  # the samples really score differently


def test_wrong_directions_are_config_errors(runs):
    rm_config, rm_params = load_reward_model(runs[1])
    with pytest.raises(ConfigError, match=r"direction \(1.0, 2.0, 3.0\) has 3 numbers; rm has 2"):
        reward_model(rm_config, rm_params, (1.0, 2.0, 3.0), name="rm")
    with pytest.raises(ConfigError, match=r"is zero"):
        reward_model(rm_config, rm_params, (0.0, 0.0))
    with pytest.raises(ConfigError, match=r"has 2 objectives: give a direction of 2 numbers"):
        reward_model(rm_config, rm_params, None)
    assert reward_model(rm_config, rm_params, (3, 4)).direction == (0.6, 0.8)


def _generate(capsys, runs, out, *flags):
    prompts = out.parent / "prompts.jsonl"
    prompts.write_text("".join(PROMPTS.read_text().splitlines(keepends=True)[:3]))
    argv = ["generate", "--model", f"checkpoint:{runs[0]}", "--prompts", prompts, "--out", out]
    argv += ["--max_new_tokens", STEPS, "--temperature", 1.5, *flags]
    try:
        cli.main([str(a) for a in argv])
        status = 0
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def test_generate_best_of_by_direction(runs, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    flags = ("--best_of", N, "--reward_model", runs[1], "--direction", "0.6,0.8")
    status, err = _generate(capsys, runs, out, *flags)
    assert status == 0, err
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 3 and all(np.isfinite(x["score"]) for x in lines)
    assert all(0 <= x["sample"] < N for x in lines)


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--best_of", 2, "--reward_model", "RM", "--direction", "1,2,3"), "has 3 numbers; "),
        (("--best_of", 2, "--reward_model", "RM", "--direction", "a,b"), "comma-separated"),
        (("--best_of", 2, "--reward_model", "RM"), "has 2 objectives: give a direction"),
        (("--best_of", 2, "--reward_model", "RM", "--reward", "demo_judge"), "one of --reward"),
        (("--direction", "1,2"), "--direction goes with --reward_model DIR"),
        (("--reward_model", "RM"), "--reward_model go with --best_of N"),
    ],
)
def test_bad_flags_exit_2_naming_them(runs, tmp_path, capsys, flags, message):
    flags = [runs[1] if f == "RM" else f for f in flags]
    status, err = _generate(capsys, runs, tmp_path / "out.jsonl", *flags)
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err
