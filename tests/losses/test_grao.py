"""GRAO (jaxalign.losses.grao): the pairwise term against float64 NumPy written from the formula
(values and gradients, by central finite differences of the reference), the documented choices
pinned (pairs from the advantages, empty groups give 0, padded rows join no pair), the grpo
family's wiring (the term added with pair_coef, the config errors) and a smoke run of
configs/grao/tiny.py through `jaxalign.train.train`."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.config import apply_overrides, load_config
from jaxalign.errors import ConfigError
from jaxalign.losses import grao_pairwise

ROOT = pathlib.Path(__file__).resolve().parents[2]
G, GROUPS = 4, 3


def _reference(s, a, m, beta):
    """Per group: mean over pairs (i, j), A_i > A_j, both real, of -log sigmoid(beta (s_i - s_j));
    0 without pairs. Returns (mean over groups, per-group values, per-group accuracy)."""
    groups, accuracy = [], []
    for g in range(len(s) // G):
        idx = range(g * G, (g + 1) * G)
        pairs = [(i, j) for i in idx for j in idx if m[i] and m[j] and a[i] > a[j]]
        losses = [np.log1p(np.exp(-beta * (s[i] - s[j]))) for i, j in pairs]
        groups.append(np.mean(losses) if pairs else 0.0)
        accuracy.append(np.mean([s[i] > s[j] for i, j in pairs]) if pairs else 0.0)
    return np.mean(groups), np.array(groups), np.array(accuracy)


def _inputs(seed):
    rng = np.random.default_rng(seed)
    s = rng.normal(-2.0, 1.0, G * GROUPS)
    a = rng.normal(size=G * GROUPS)
    a[G : 2 * G] = 0.5  # a group of equal rewards: no pair
    a[2 * G + 1] = a[2 * G + 2]  # a tie inside a group: that pair is not counted
    m = np.ones(G * GROUPS)
    m[-1] = 0.0  # a padded row
    return s, a, m


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_pairwise_term_values_and_gradients_against_numpy(beta):
    s, a, m = _inputs(0)
    share, metrics = grao_pairwise(jnp.asarray(s, jnp.float32), a, m, group_size=G, beta=beta)
    total, groups, accuracy = _reference(s, a, m, beta)
    np.testing.assert_allclose(float(share.mean()), total, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(share).reshape(-1, G).mean(1), groups, atol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics["grao/pair_loss"])[::G], groups, atol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics["grao/pair_accuracy"])[::G], accuracy)
    assert groups[1] == 0 and np.asarray(metrics["grao/pairs"])[G] == 0
    assert np.asarray(metrics["grao/pairs"])[2 * G] == 2  # 3 real rows, one tie: 3 - 1 pairs

    def mean_loss(x):
        return grao_pairwise(x, a, m, group_size=G, beta=beta)[0].mean()

    grad = np.asarray(jax.grad(mean_loss)(jnp.asarray(s, jnp.float32)))
    eps, numeric = 1e-6, np.zeros_like(s)
    for i in range(len(s)):
        up, down = s.copy(), s.copy()
        up[i] += eps
        down[i] -= eps
        numeric[i] = (_reference(up, a, m, beta)[0] - _reference(down, a, m, beta)[0]) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=2e-6, rtol=0)
    assert grad[-1] == 0 and np.all(grad[G : 2 * G] == 0)  # padded row, pairless group


def test_pairs_follow_the_advantages_not_the_scores():
    """Raising the better row's score lowers the loss; the order of the rows does not matter."""
    s = jnp.array([-1.0, -2.0, -3.0, -4.0])
    a = jnp.array([-1.0, 2.0, 0.0, 1.0])  # best: row 1
    m = jnp.ones(4)
    grad = jax.grad(lambda x: grao_pairwise(x, a, m, group_size=4)[0].mean())(s)
    assert grad[1] < 0 and grad[0] > 0  # the best row pushed up, the worst down
    perm = jnp.array([2, 0, 3, 1])
    swapped = grao_pairwise(s[perm], a[perm], m, group_size=4)[0].mean()
    np.testing.assert_allclose(swapped, grao_pairwise(s, a, m, group_size=4)[0].mean(), rtol=1e-6)


def _config(*overrides):
    config = load_config(f"{ROOT / 'configs/grao/tiny.py'}:smoke=True")
    return apply_overrides(config, list(overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["rl.minibatches=2"],
            "GRAO compares the 8 rows of a prompt, so it needs the rows in order",
        ),
        (["rl.epochs=2"], "rl.minibatches=1 and rl.epochs=1 \\(got minibatches=1, epochs=2"),
        (["rl.pair_beta=0.0"], "rl.pair_beta=0.0: expected >= 0 and > 0"),
        (["trainer=rloo"], "GRAO's pairwise term is a grpo option"),
    ],
)
def test_bad_grao_settings_are_named(overrides, message, tmp_path):
    from jaxalign.train import train

    with pytest.raises(ConfigError, match=message):
        train(_config(*overrides), tmp_path / "run")


def test_grao_tiny_config_trains_with_its_pairwise_metrics(tmp_path):
    """configs/grao/tiny.py (smoke, 2 steps of 4 prompts x 8 samples, no eval) runs through
    `jaxalign.train.train`: finite losses, the pairwise metrics logged with pairs found, a
    checkpoint written. The random-init model earns no judge reward, so a length reward (target 3
    tokens) gives the groups different rewards."""
    from jaxalign.train import train

    workdir = tmp_path / "grao"
    config = _config(
        f"tokenizer={ROOT / 'data/demo/tokenizer.model'}",
        "steps=2",
        "data.eval=",
        "eval_batches=0",
        "rl.rewards=(('length', 1.0, {'target': 3, 'scale': 2.0}),)",
    )
    train(config, workdir)
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 and all(np.isfinite(r["loss"]) for r in steps)
    assert all(0 <= r["grao/pair_accuracy"] <= 1 for r in steps)
    assert all(r["grao/pairs"] > 0 and r["grao/pair_loss"] > 0 for r in steps)
    assert (workdir / "checkpoints").is_dir()
