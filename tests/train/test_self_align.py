"""Self-alignment (I-SHEEP style; rft with `rl.rft_self_judge`): the self-judgment and the pick of
each prompt's best against float64 NumPy references (values, and the gradient of the judgment),
the judge on model rows against a NumPy log-softmax of the model's logits, the recipe run end to
end on the tiny model, its one-line config errors, and (slow) held-out judge accuracy rising
from an SFT start."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import models as M
from jaxalign.config import apply_overrides, load_config
from jaxalign.errors import ConfigError
from jaxalign.train import init_params, self_labels, setup, train, updates

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOKENIZER = f"tokenizer={ROOT / 'data/demo/tokenizer.model'}"


def _records(workdir, split="train"):
    return [r for r in map(json.loads, open(workdir / "metrics.jsonl")) if r["split"] == split]


# --- the self-judgment ----------------------------------------------------------------------


def reference_scores(logps, mask):
    """The mean log-prob of each completion's tokens, one row at a time in float64."""
    out = []
    for lp_row, m_row in zip(logps, mask, strict=True):
        picked = [float(lp) for lp, m in zip(lp_row, m_row, strict=True) if m > 0]
        out.append(sum(picked) / len(picked) if picked else 0.0)
    return np.array(out)


def _rows(rng, R=12, T=9):
    logps = -rng.exponential(1.0, (R, T))
    lengths = rng.integers(0, T + 1, R)
    lengths[0] = 0  # a completion of no tokens scores 0
    mask = (np.arange(T)[None, :] >= T - lengths[:, None]).astype(np.float64)
    return logps, mask


def test_self_judge_scores_against_numpy():
    logps, mask = _rows(np.random.default_rng(0))
    got = np.asarray(self_labels.self_judge_scores(logps, mask))
    np.testing.assert_allclose(got, reference_scores(logps, mask), rtol=1e-6, atol=1e-7)
    assert got[0] == 0.0


def test_self_judge_gradient_against_finite_differences():
    logps, mask = _rows(np.random.default_rng(1), R=5, T=6)
    weights = np.random.default_rng(2).normal(size=5)

    def total(lp):
        return (self_labels.self_judge_scores(lp, mask) * weights).sum()

    with jax.enable_x64():
        grad = np.asarray(jax.grad(total)(jnp.asarray(logps)))
    eps, fd = 1e-6, np.zeros_like(logps)
    for idx in np.ndindex(*logps.shape):
        plus, minus = logps.copy(), logps.copy()
        plus[idx] += eps
        minus[idx] -= eps
        fd[idx] = (
            (reference_scores(plus, mask) - reference_scores(minus, mask)) @ weights / (2 * eps)
        )
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


def test_self_judged_best_against_numpy():
    """The best-judged sample per prompt (the first of equal scores wins) is kept iff its score
    reaches the threshold (inclusive)."""
    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(-1, 0.5, (40, 4)), 1)  # rounded: ties happen
    scores[0] = [-0.5, -0.7, -0.5, -2.0]
    got = jax.device_get(self_labels.self_judged_best(scores, min_score=-0.5))
    best = [max(range(4), key=lambda k: (row[k], -k)) for row in scores]
    assert got["best"].tolist() == best and best[0] == 0
    np.testing.assert_array_equal(got["score"], scores[np.arange(40), best].astype(np.float32))
    assert got["keep"].tolist() == [scores[i, b] >= -0.5 for i, b in enumerate(best)]
    assert got["keep"][0] and 0 < got["keep"].mean() < 1


def reference_consistency(completions, G):
    """Per completion, the share of its group of G (consecutive) with equal tokens, by counting
    pairs one at a time in float64."""
    out = []
    for i, c in enumerate(completions):
        group = completions[(i // G) * G : (i // G + 1) * G]
        out.append(sum(list(other) == list(c) for other in group) / G)
    return np.array(out)


def test_self_consistency_scores_against_numpy():
    """Equal token sequences (not equal prefixes, not equal lengths) count; groups do not mix."""
    rng = np.random.default_rng(5)
    G, answers = 4, [[7, 2], [7], [7, 2, 1], [9, 9], []]
    picks = rng.integers(0, len(answers), 40)
    picks[:4] = [0, 1, 0, 2]  # [7, 2] twice; its prefix [7] and extension [7, 2, 1] differ
    picks[4:8] = [4, 4, 4, 4]  # four empty completions agree
    completions = [np.array(answers[k], np.int32) for k in picks]
    got = self_labels.self_consistency_scores(completions, G)
    np.testing.assert_allclose(got, reference_consistency(completions, G), rtol=0, atol=1e-7)
    assert got[:8].tolist() == [0.5, 0.25, 0.5, 0.25, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        self_labels.self_consistency_scores(completions, 3)


def _rollout_rows(tokens, targets, mask, rewards):
    """Rollout rows of one unpacked sequence each (what the online loop hands `to_batch`)."""
    R, T = tokens.shape
    return {
        "tokens": tokens,
        "targets": targets,
        "loss_mask": np.asarray(mask, np.float32),
        "positions": np.tile(np.arange(T, dtype=np.int32), (R, 1)),
        "segment_ids": np.ones((R, T), np.int32),
        "seq_index": np.zeros((R, T), np.int32),
        "rewards": np.asarray(rewards, np.float32),
        "example_mask": np.ones(R, np.float32),
    }


def test_self_consistency_picks_the_majority_answer(monkeypatch):
    """The trainer's pick with the consistency judge: the group's most frequent completion (the
    first sample giving it), kept iff its share reaches the threshold."""
    run = setup(_config("rl.rft_self_judge=consistency", "rl.rft_min_reward=0.5"))
    assert run.config.rl.group_size == 4
    T, completions = 6, [[5, 2], [5, 3], [5, 3], [4], [8], [9], [8], [7]]
    R = len(completions)
    targets = np.zeros((R, T), np.int32)
    mask = np.zeros((R, T), np.float32)
    for r, c in enumerate(completions):
        targets[r, T - len(c) :], mask[r, T - len(c) :] = c, 1
    rows = _rollout_rows(np.roll(targets, 1, axis=1), targets, mask, [0, 1, 1, 0, 0, 0, 0, 1])
    chosen = []
    fake = lambda run, rows, sides, kept: chosen.append((sides[0], kept))  # noqa: E731
    monkeypatch.setattr(updates, "_stacked", fake)
    _, metrics, _ = updates.best_batch(run)({"params": None, "rl": {}}, None, rows)
    best, kept = chosen[0]
    assert best.tolist() == [1, 4] and kept.tolist() == [True, True]
    assert metrics["rft/self_judge"] == 0.5 and metrics["rft/judge_agreement"] == 0.5


# --- the recipe -----------------------------------------------------------------------------


def _config(*overrides):
    return apply_overrides(
        load_config(f"{ROOT / 'configs/self_align/tiny.py'}:smoke=True"),
        [
            TOKENIZER,
            f"data.train={ROOT / 'data/demo/sft_train.jsonl'}",
            "data.eval=",
            "rl.max_new_tokens=4",
            *overrides,
        ],
    )


def test_self_judge_on_model_rows_against_numpy_log_softmax():
    """The judge the trainer runs (params -> forward -> log-probs at temperature 1 -> the mean on
    the loss mask) equals a float64 NumPy log-softmax of the model's logits."""
    run = setup(_config())
    params = init_params(run)
    rng = np.random.default_rng(4)
    R, T = 8, 10
    tokens = rng.integers(3, run.model_config.vocab_size, (R, T)).astype(np.int32)
    lengths = rng.integers(1, 6, R)
    mask = (np.arange(T)[None, :] >= T - 1 - lengths[:, None]) & (np.arange(T)[None, :] < T - 1)
    rows = _rollout_rows(tokens, np.roll(tokens, -1, axis=1), mask, np.zeros(R))
    got = updates._self_judge(run)(params, None, rows)
    forward = jax.jit(M.forward, static_argnums=0)
    hidden = forward(run.model_config, params, tokens, rows["positions"], rows["segment_ids"])
    z = np.asarray(hidden, np.float64) @ np.asarray(M.unembedding(run.model_config, params))
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    token = np.take_along_axis(logp, rows["targets"][..., None], axis=-1)[..., 0]
    want = reference_scores(token, rows["loss_mask"])
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_self_align_smoke(tmp_path):
    """Two rounds of the recipe; a threshold every answer of the random model reaches, so each
    round fine-tunes on every prompt's best-judged answer."""
    summary = train(_config("steps=2", "rl.rft_min_reward=-100.0"), tmp_path)
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert np.isfinite(r["loss"]) and r["loss"] > 0 and r["rft/kept"] == 1.0
        assert -100 < r["rft/self_judge"] < 0 and "rft/judge_agreement" in r
        assert "rewards/demo_judge" in r
    assert summary["steps"] == [0, 2] and pathlib.Path(summary["checkpoint"]).is_dir()


@pytest.mark.parametrize(
    "override, message",
    [
        (
            ("rl.rft_self_judge=confidence", "rl.rft_min_reward=0.5"),
            r"rl.rft_min_reward=0.5 with rl.rft_self_judge='confidence': .* <= 0",
        ),
        (
            ("rl.rft_self_judge=consistency", "rl.rft_min_reward=-0.5"),
            r"rl.rft_min_reward=-0.5 with rl.rft_self_judge='consistency': .* \(0, 1\]",
        ),
        (("rl.rft_self_judge=vote",), r"rl.rft_self_judge='vote'; expected one of '', "),
        (("trainer=grpo",), r'rl.rft_self_judge: trainer "grpo" has no self-judged selection'),
    ],
)
def test_self_align_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        setup(_config(*override))
