"""Decoding diagnostics against NumPy references written from their definitions: entropies and
ranks from a right-padded full forward in float64, the branching-factor and token-shift tables
by explicit loops, the decoding sweep's aggregates from per-setting generations; then
`jaxalign diagnose` end to end (JSON equal to the library, a PNG, named errors)."""

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
from jaxalign.sampling import SamplingOptions, generate, prompts_from_ids
from jaxalign.sampling import diagnostics as D
from jaxalign.sampling.engine import _decode_loop

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOKENIZER = str(ROOT / "data/demo/tokenizer.model")
STEPS, N = 10, 3
PAD, EOS = 3, 463  # 463: a token the sampled rows emit, so some stop early
PROMPTS = [[1, 45, 12, 99, 7], [1, 300, 301], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13]]


def _model(seed, scale=20.0):
    """tiny-64 with its unembedding scaled 20x: next-token distributions far from uniform."""
    config = M.get_preset("tiny-64")
    params = M.init_params(config, jax.random.key(seed))
    params["unembed"]["kernel"] = params["unembed"]["kernel"] * scale
    return config, params


@pytest.fixture(scope="module")
def models():
    """A base model and an "aligned" one near it (0.9 base + 0.1 another): its sampled tokens
    fall in every shift category under the base."""
    base, other = _model(0), _model(1)
    near = jax.tree.map(lambda x, y: 0.9 * x + 0.1 * y, base[1], other[1])
    return base, (base[0], near)


def _sample(model, temperature=1.0, eos=EOS):
    options = SamplingOptions(
        max_new_tokens=STEPS, n=N, temperature=temperature, eos_id=eos, pad_id=PAD
    )
    prompts = prompts_from_ids(PROMPTS, PAD)
    return prompts, generate(*model, prompts, rng=jax.random.key(0), options=options)


_forward = jax.jit(M.forward, static_argnums=0)


def _reference_logits(model, result):
    """float64 next-token logits before each generated token [R, STEPS, V] from one right-padded
    full forward of prompt + completion."""
    config, params = model
    R = result.tokens.shape[0]
    T = max(map(len, PROMPTS)) + STEPS
    tokens, segments = np.zeros((R, T), np.int32), np.zeros((R, T), np.int32)
    where = np.zeros((R, STEPS), np.int32)
    for r in range(R):
        prompt = PROMPTS[result.prompt_index[r]]
        seq = prompt + result.tokens[r, : result.lengths[r]].tolist()
        tokens[r, : len(seq)], segments[r, : len(seq)] = seq, 1
        where[r] = len(prompt) - 1 + np.arange(STEPS)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (R, T))
    hidden = np.asarray(_forward(config, params, tokens, positions, segments), np.float64)
    hidden = np.take_along_axis(hidden, where[:, :, None], axis=1)
    return hidden @ np.asarray(M.unembedding(config, params), np.float64)


def test_branching_factor_equals_exp_mean_entropy_by_position(models):
    model = models[0]
    prompts, result = _sample(model)
    assert (result.lengths < STEPS).any()  # rows that stopped early drop out of later positions
    z = _reference_logits(model, result)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = -(p * np.log(p)).sum(-1)
    got = D.token_entropies(*model, prompts, result)
    for r in range(result.tokens.shape[0]):
        L = result.lengths[r]
        np.testing.assert_allclose(got[r, :L], entropy[r, :L], atol=2e-5, rtol=0)
        assert (got[r, L:] == 0).all()
    table = D.branching_factor(got, result.lengths)
    tokens = 0
    total = 0.0
    for t in range(STEPS):
        h = [entropy[r, t] for r in range(len(got)) if t < result.lengths[r]]
        assert table["rows"][t] == len(h)
        if h:
            assert table["mean_entropy"][t] == pytest.approx(np.mean(h), abs=2e-5)
            assert table["branching_factor"][t] == pytest.approx(np.exp(np.mean(h)), rel=2e-5)
        else:
            assert table["branching_factor"][t] is None
        tokens, total = tokens + len(h), total + sum(h)
    assert table["overall"]["tokens"] == tokens
    assert table["overall"]["branching_factor"] == pytest.approx(np.exp(total / tokens), rel=2e-5)
    assert 1 < table["overall"]["branching_factor"] < 512  # between one token and uniform


def test_token_ranks_and_shift_fractions(models):
    base, aligned = models
    prompts, result = _sample(aligned, temperature=1.0)
    z = _reference_logits(base, result)
    got = D.token_ranks(*base, prompts, result)
    near_ties = 0
    for r in range(result.tokens.shape[0]):
        for t in range(result.lengths[r]):
            y = result.tokens[r, t]
            order = list(np.argsort(-z[r, t], kind="stable"))
            # ties within float32 rounding of the logit may rank either way: count, skip
            if np.sum(np.abs(z[r, t] - z[r, t, y]) < 1e-5) > 1:
                near_ties += 1
                continue
            assert got[r, t] == order.index(y) + 1, (r, t)
        assert (got[r, result.lengths[r] :] == 0).all()
    assert near_ties == 0
    table = D.shift_table(got, result.lengths)
    flat = [got[r, t] for r in range(len(got)) for t in range(result.lengths[r])]
    assert table["overall"]["tokens"] == len(flat)
    expect = {
        "unshifted": np.mean([k == 1 for k in flat]),
        "marginal": np.mean([2 <= k <= 3 for k in flat]),
        "shifted": np.mean([k > 3 for k in flat]),
    }
    for name, frac in expect.items():
        assert table["overall"][name] == pytest.approx(frac, abs=1e-12)
        for t in range(STEPS):
            ks = [got[r, t] for r in range(len(got)) if t < result.lengths[r]]
            want = {"unshifted": [k == 1 for k in ks], "marginal": [2 <= k <= 3 for k in ks]}
            want["shifted"] = [k > 3 for k in ks]
            if ks:
                assert table[name][t] == pytest.approx(np.mean(want[name]), abs=1e-12)
    assert min(expect.values()) > 0  # every category occurs
    # A model's own greedy tokens are all rank 1 under itself.
    prompts, greedy = _sample(base, temperature=0.0)
    own = D.token_ranks(*base, prompts, greedy)
    assert D.shift_table(own, greedy.lengths)["overall"]["unshifted"] == 1.0


def _reward(record, text):
    """A deterministic reward of the completion text."""
    return float(len(text) % 5) - record["bonus"]


def test_decoding_sweep_aggregates_every_setting_and_compiles_once(models):
    model = models[0]
    records = [{"bonus": i} for i in range(len(PROMPTS))]
    batches = [prompts_from_ids(PROMPTS[:2], PAD), prompts_from_ids(PROMPTS[2:] + [[]], PAD)]
    batches[0]["records"] = records[:2]
    batches[1]["records"] = records[2:] + [None]  # an empty batch slot: left out
    tokenizer = _ByteTokenizer()
    options = SamplingOptions(max_new_tokens=STEPS, n=N, eos_id=EOS, pad_id=PAD)
    settings = D.sweep_grid([0.0, 0.7], [0.5, 1.0], [0, 5])
    assert len(settings) == 8 and settings[1] == D.Setting(0.0, 0.5, 5)
    rng = jax.random.key(3)
    D.decoding_sweep(
        *model,
        batches,
        reward=_reward,
        settings=settings[:1],
        rng=rng,
        options=options,
        tokenizer=tokenizer,
    )
    size = _decode_loop._cache_size()
    table = D.decoding_sweep(
        *model,
        batches,
        reward=_reward,
        settings=settings,
        rng=rng,
        options=options,
        tokenizer=tokenizer,
    )
    assert _decode_loop._cache_size() == size  # new settings are traced values
    per_setting = []
    for s, setting in enumerate(settings):
        opts = dataclasses.replace(
            options, temperature=setting.temperature, top_p=setting.top_p, top_k=setting.top_k
        )
        rewards = []  # [prompt][sample]
        for b, batch in enumerate(batches):
            key = jax.random.fold_in(jax.random.fold_in(rng, s), b)
            result = generate(*model, batch, rng=key, options=opts, tokenizer=tokenizer)
            for i, record in enumerate(batch["records"]):
                if record is not None:
                    rewards.append([_reward(record, result.text[i * N + j]) for j in range(N)])
        rewards = np.array(rewards)
        per_setting.append(rewards)
        row = table["settings"][s]
        assert row == dataclasses.asdict(setting) | {
            "mean": pytest.approx(rewards.mean()),
            "worst_of_n": pytest.approx(rewards.min(1).mean()),
            "min": rewards.min(),
        }
    greedy = table["settings"][0]
    assert greedy["mean"] == greedy["worst_of_n"]  # T = 0: n equal samples
    assert table["prompts"] == 3 and table["n"] == N
    worst = np.min([r.min(1) for r in per_setting], axis=0)
    assert table["worst_case"] == pytest.approx(worst.mean())
    means = [r.mean() for r in per_setting]
    assert table["lowest_mean"]["mean"] == pytest.approx(min(means))
    assert table["highest_mean"]["mean"] == pytest.approx(max(means))


class _ByteTokenizer:
    """Text of ids for the sweep's reward: one character per id."""

    vocab_size = 512

    def decode(self, ids):
        return "".join(chr(33 + int(i) % 90) for i in ids)


# --- `jaxalign diagnose` ----------------------------------------------------------------------


def _checkpoint(workdir, seed, vocab_size=512):
    config = apply_overrides(
        load_config(f"{ROOT / 'configs/sft/tiny.py'}:smoke=True"), [f"tokenizer={TOKENIZER}"]
    )
    model_config = M.get_preset(config.model.preset, vocab_size=vocab_size)
    params = M.init_params(model_config, jax.random.key(seed))
    params["unembed"]["kernel"] = params["unembed"]["kernel"] * 6.0
    manager = ckpt.make_manager(workdir, async_save=False)
    record = to_dict(config) | {"model_config": dataclasses.asdict(model_config)}
    ckpt.save(manager, 0, {"step": np.int32(0), "params": params}, {"next_index": 0}, record)
    manager.close()
    return f"checkpoint:{workdir}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {
        "a": _checkpoint(root / "a", 0),
        "b": _checkpoint(root / "b", 1),
        "wide": _checkpoint(root / "wide", 2, vocab_size=640),
    }


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = (ROOT / "data/demo/prompts_eval.jsonl").read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:5]))
    return path


def _diagnose(capsys, *argv):
    try:
        cli.main(["diagnose", *map(str, argv)])
        status = 0
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def test_diagnose_writes_json_tables_and_png_plots(runs, prompts, tmp_path, capsys):
    out = tmp_path / "diag"
    common = ("--prompts", prompts, "--out", out, "--max_new_tokens", 6, "--batch_size", 4)
    status, err = _diagnose(
        capsys, "branching", "--model", runs["a"], "--model", runs["b"], "--n", 2, *common
    )
    assert status == 0, err
    status, err = _diagnose(
        capsys, "shift", "--base", runs["a"], "--aligned", runs["a"], "--temperature", 0, *common
    )
    assert status == 0, err
    status, err = _diagnose(
        capsys,
        "sweep",
        "--model",
        runs["a"],
        "--reward",
        "demo_judge",
        "--temperatures",
        0,
        1,
        "--top_ps",
        1,
        "--top_ks",
        0,
        5,
        *common,
    )
    assert status == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "branching.json",
        "branching.png",
        "shift.json",
        "shift.png",
        "sweep.json",
        "sweep.png",
    ]
    for name in ("branching", "shift", "sweep"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bf = json.loads((out / "branching.json").read_text())
    assert list(bf["models"]) == [runs["a"], runs["b"]] and bf["options"]["n"] == 2
    assert bf["models"][runs["a"]]["overall"]["tokens"] > 0
    shift = json.loads((out / "shift.json").read_text())
    assert shift["overall"]["unshifted"] == 1.0  # a model's own greedy tokens
    sweep = json.loads((out / "sweep.json").read_text())
    assert [(r["temperature"], r["top_k"]) for r in sweep["settings"]] == [
        (0.0, 0),
        (0.0, 5),
        (1.0, 0),
        (1.0, 5),
    ]
    assert sweep["prompts"] == 5 and sweep["reward"] == "demo_judge"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["sweep", "--model", "A"], "diagnose sweep needs --reward NAME"),
        (["shift", "--base", "A"], "diagnose shift needs --base SPEC and --aligned SPEC"),
        (["shift", "--base", "A", "--aligned", "WIDE"], "vocabulary sizes differ (--base"),
        (["branching"], "diagnose branching needs --model SPEC"),
        (
            ["sweep", "--model", "A", "--reward", "demo_judge", "--top_ps", "0"],
            "sampling option top_p=0.0",
        ),
    ],
)
def test_diagnose_errors_are_one_line(runs, prompts, tmp_path, capsys, argv, message):
    argv = [runs["a"] if a == "A" else runs["wide"] if a == "WIDE" else a for a in argv]
    status, err = _diagnose(capsys, *argv, "--prompts", prompts, "--out", tmp_path / "d")
    assert status == 2 and err.startswith("jaxalign: ") and message in err, err
    assert not (tmp_path / "d").exists()
