"""Self-generated data: SPA's self-labels against a float64 NumPy reference (values and the
gradient of the preference probability), the spa family run end to end on the tiny model, its
one-line config errors, and (slow) its metric moving on the demo task."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import models as M
from jaxalign.checkpoint import save_hf
from jaxalign.config import apply_overrides, load_config
from jaxalign.errors import ConfigError
from jaxalign.train import self_labels, setup, train

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOKENIZER = f"tokenizer={ROOT / 'data/demo/tokenizer.model'}"


def _records(workdir, split="train"):
    return [r for r in map(json.loads, open(workdir / "metrics.jsonl")) if r["split"] == split]


# --- SPA labels ---------------------------------------------------------------------------


def reference_labels(pol, ref, beta, tau):
    """From the paper's rule, one prompt at a time in float64."""
    out = []
    for p_row, r_row in zip(pol, ref, strict=True):
        s = [float(a) - float(b) for a, b in zip(p_row, r_row, strict=True)]
        hi = max(range(len(s)), key=lambda k: (s[k], -k))  # first of equal wins
        lo = min(range(len(s)), key=lambda k: (s[k], k))
        prob = 1.0 / (1.0 + np.exp(-beta * (s[hi] - s[lo])))
        out.append((hi, lo, prob, abs(prob - 0.5) > tau))
    return out


@pytest.mark.parametrize("G", [2, 4])
def test_spa_labels_against_numpy(G):
    rng = np.random.default_rng(G)
    B, beta, tau = 64, 0.3, 0.1
    pol, ref = rng.normal(-20, 1, (B, G)), rng.normal(-20, 1, (B, G))
    got = jax.device_get(self_labels.spa_labels(pol, ref, beta=beta, min_confidence=tau))
    want = reference_labels(pol, ref, beta, tau)
    assert got["chosen"].tolist() == [w[0] for w in want]
    assert got["rejected"].tolist() == [w[1] for w in want]
    np.testing.assert_allclose(got["prob"], [w[2] for w in want], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["confidence"], got["prob"] - 0.5, rtol=0, atol=0)
    assert got["keep"].tolist() == [w[3] for w in want]
    assert 0 < got["keep"].mean() < 1  # the threshold bites both ways


def test_spa_prob_gradient_against_finite_differences():
    rng = np.random.default_rng(0)
    B, G, beta = 6, 3, 0.5
    pol, ref = rng.normal(0, 2, (B, G)), rng.normal(0, 2, (B, G))

    def total(pol, ref):
        return self_labels.spa_labels(pol, ref, beta=beta, min_confidence=0.0)["prob"].sum()

    with jax.enable_x64():
        grads = jax.grad(total, argnums=(0, 1))(jnp.asarray(pol), jnp.asarray(ref))

    def numpy_total(pol, ref):
        return sum(w[2] for w in reference_labels(pol, ref, beta, 0.0))

    eps = 1e-6
    for which, g in zip((0, 1), grads, strict=True):
        fd = np.zeros((B, G))
        for idx in np.ndindex(B, G):
            plus = [pol.copy(), ref.copy()]
            minus = [pol.copy(), ref.copy()]
            plus[which][idx] += eps
            minus[which][idx] -= eps
            fd[idx] = (numpy_total(*plus) - numpy_total(*minus)) / (2 * eps)
        np.testing.assert_allclose(np.asarray(g), fd, rtol=1e-6, atol=1e-8)


def test_spa_equal_rewards_are_not_confident():
    """At the reference itself every implicit reward is 0: no pair is confident, nothing trains
    (why SPA starts from a DPO run, not from its reference)."""
    s = np.zeros((3, 2))
    got = self_labels.spa_labels(s, s, beta=0.1, min_confidence=0.0)
    assert not np.asarray(got["keep"]).any()
    assert np.asarray(got["chosen"]).tolist() == [0, 0, 0]


# --- the spa family -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A random tiny model of another seed, as an hf directory: a reference unlike the policy."""
    out = tmp_path_factory.mktemp("ref") / "hf"
    config = M.PRESETS["tiny-64"]
    save_hf(config, jax.jit(M.init_params, static_argnums=0)(config, jax.random.key(7)), str(out))
    return out


def _spa_config(*overrides):
    return apply_overrides(
        load_config(f"{ROOT / 'configs/spa/tiny.py'}:smoke=True"),
        [
            TOKENIZER,
            f"data.train={ROOT / 'data/demo/sft_train.jsonl'}",
            "data.eval=",
            "rl.max_new_tokens=4",
            *overrides,
        ],
    )


def test_spa_smoke(other_model, tmp_path):
    config = _spa_config(
        f"reference.soup=('hf:{other_model}',)", "rl.spa_min_confidence=0.01", "steps=2"
    )
    summary = train(config, tmp_path)
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert np.isfinite(r["loss"]) and 0 < r["spa/kept"] < 1 and r["spa/confidence"] > 0
        assert "spa/judge_agreement" in r and "reward" in r
    # The first update sees the params that labelled its pairs: DPO's margin agrees on each.
    assert records[0]["rewards/accuracy"] == 1.0
    assert summary["steps"] == [0, 2] and pathlib.Path(summary["checkpoint"]).is_dir()


@pytest.mark.parametrize(
    "override, message",
    [
        ("rl.group_size=1", "rl.group_size=1: spa compares"),
        ("loss.beta=0.0", "loss.beta=0.0: spa labels pairs by beta"),
        ("reference.update=soft", 'reference schedules are for the offline families .* "spa"'),
    ],
)
def test_spa_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        run = setup(_spa_config(override))
        run.family.to_batch(run)


# --- RL from the base model ---------------------------------------------------------------


def test_grpo_from_base_smoke(tmp_path):
    """The RL-zero recipe starts from the random init (no SFT) and logs both of its rewards."""
    config = apply_overrides(
        load_config(f"{ROOT / 'configs/grpo/from_base_tiny.py'}:smoke=True"),
        [TOKENIZER, f"data.train={ROOT / 'data/demo/sft_train.jsonl'}", "data.eval=", "steps=2"],
    )
    assert config.model.init_from == ""
    summary = train(config, tmp_path)
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert np.isfinite(r["loss"]) and {"rewards/demo_judge", "rewards/format"} <= set(r)
    assert summary["steps"] == [0, 2] and pathlib.Path(summary["checkpoint"]).is_dir()
