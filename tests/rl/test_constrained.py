"""HC-RLHF's pure pieces against float64 NumPy references written from the formulas (values and
gradients, random inputs): the Student-t quantile (against a quantile computed here by
integrating the t density, and table values), the pessimistic bound, the safety test, the
Lagrangian RLOO advantage and the multiplier update."""

import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.rl import constrained
from jaxalign.train import updates


def fd_grad(f, x, eps=1e-6):
    """Central finite differences of a scalar float64 function."""
    x = np.array(x, np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += eps
        down[i] -= eps
        grad[i] = (f(up) - f(down)) / (2 * eps)
    return grad


@functools.cache
def np_t_quantile(p, dof):
    """Student-t quantile from the density: CDF(x) = 1/2 + integral_0^x pdf (Simpson, 20001
    points), inverted by bisection; p > 1/2."""
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)

    def cdf(x):
        grid = np.linspace(0.0, x, 20001)
        pdf = np.exp(log_norm - (dof + 1) / 2 * np.log1p(grid**2 / dof))
        h = grid[1] - grid[0]
        return 0.5 + h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())

    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def np_bound(c, ns, delta, c1, c2, tau):
    nb = len(c)
    width = c1 * np_t_quantile(1 - delta, nb - 1) / np.sqrt(nb)
    width += c2 * np_t_quantile(1 - delta, ns - 1) / np.sqrt(ns)
    return c.mean() + width * c.std(ddof=1) - tau


def np_ucb(c, delta):
    n = len(c)
    return c.mean() + np_t_quantile(1 - delta, n - 1) * c.std(ddof=1) / np.sqrt(n)


def np_rloo(x, G):
    g = x.reshape(-1, G)
    return (g - (g.sum(axis=1, keepdims=True) - g) / (G - 1)).reshape(-1)


@pytest.mark.parametrize(
    "p, dof, table",
    # Student-t tables (4 decimals): t_{0.90,7}, t_{0.95,7}, t_{0.90,99}, t_{0.975,1}.
    [(0.9, 7, 1.4149), (0.95, 7, 1.8946), (0.9, 99, 1.2902), (0.975, 1, 12.7062)],
)
def test_t_quantile(p, dof, table):
    got = constrained.t_quantile(p, dof)
    assert got == pytest.approx(np_t_quantile(p, dof), rel=1e-6)
    assert got == pytest.approx(table, abs=1e-4)


@pytest.mark.parametrize("p, dof", [(0.0, 5), (1.0, 5), (0.9, 0)])
def test_t_quantile_refuses_what_has_none(p, dof):
    with pytest.raises(ValueError, match="t_quantile"):
        constrained.t_quantile(p, dof)


@pytest.mark.parametrize(
    "nb, ns, delta, c1, c2, tau",
    [(8, 100, 0.1, 4.0, 2.0, 0.0), (32, 10, 0.05, 1.0, 3.0, 0.3), (2, 2, 0.2, 0.5, 0.0, -1.0)],
)
def test_pessimistic_bound_values_and_gradient(nb, ns, delta, c1, c2, tau):
    rng = np.random.default_rng(nb + ns)
    c = rng.exponential(0.5, nb)
    hyper = dict(n_safety=ns, delta=delta, c1=c1, c2=c2, tau=tau)
    got = constrained.pessimistic_bound(jnp.asarray(c, jnp.float32), **hyper)
    np.testing.assert_allclose(float(got), np_bound(c, ns, delta, c1, c2, tau), rtol=1e-5)
    grad = jax.grad(lambda x: constrained.pessimistic_bound(x, **hyper))(jnp.float32(c))
    want = fd_grad(lambda x: np_bound(x, ns, delta, c1, c2, tau), c)
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-5)


def test_pessimistic_bound_defaults_are_the_papers():
    """d 0.1, n_safety given, C1 4, C2 2, tau 0 (METHODS.md)."""
    c = np.random.default_rng(0).uniform(size=16)
    got = constrained.pessimistic_bound(jnp.float32(c), n_safety=100)
    np.testing.assert_allclose(float(got), np_bound(c, 100, 0.1, 4.0, 2.0, 0.0), rtol=1e-5)


def test_safety_test_values_gradient_and_decision():
    rng = np.random.default_rng(1)
    c = rng.uniform(0, 1, 100)
    passed, ucb = constrained.safety_test(jnp.float32(c), tau=0.6, delta=0.1)
    want = np_ucb(c, 0.1)
    np.testing.assert_allclose(float(ucb), want, rtol=1e-5)
    assert bool(passed) == (want <= 0.6)
    grad = jax.grad(lambda x: constrained.safety_test(x, delta=0.1)[1])(jnp.float32(c))
    np.testing.assert_allclose(np.asarray(grad), fd_grad(lambda x: np_ucb(x, 0.1), c), atol=1e-5)
    # A tau above the bound is reachable, one below it (or the mean itself) is not.
    assert bool(constrained.safety_test(jnp.float32(c), tau=want + 1e-3)[0])
    assert not bool(constrained.safety_test(jnp.float32(c), tau=want - 1e-3)[0])
    assert not bool(constrained.safety_test(jnp.float32(c), tau=float(c.mean()))[0])
    # Costs that are all 0 pass tau = 0 (the default): ucb = 0.
    passed, ucb = constrained.safety_test(jnp.zeros(100))
    assert bool(passed) and float(ucb) == 0.0


@pytest.mark.parametrize("shape", [(1,), (2, 3), ()])
def test_a_bound_needs_two_costs(shape):
    with pytest.raises(ValueError, match="B >= 2"):
        constrained.safety_test(jnp.zeros(shape))


def test_lagrangian_rloo_advantage_values_and_gradient():
    """The hc_rlhf update: RLOO of (r - lambda c - kl_coef KL) per token, which equals
    RLOO(r) - lambda RLOO(c) - kl_coef RLOO(KL): the cost enters the policy gradient as itself
    (the bound's std term does not; the documented choice)."""
    rng = np.random.default_rng(2)
    G, B, T = 4, 12, 5
    r, c = rng.normal(size=B), rng.exponential(size=B)
    kl, lam, kl_coef = rng.normal(size=(B, T)) * 0.1, 0.7, 0.05
    mask = np.ones((B, T))
    mask[1, 3:] = 0
    rl = types.SimpleNamespace(group_size=G)

    def advantages(lam_):
        shaped = constrained.lagrangian_rewards(jnp.float32(r), jnp.float32(c), lam_)
        return updates.rloo_advantages(rl, shaped, jnp.float32(mask), jnp.float32(kl), kl_coef)

    seq_kl = (kl * mask).sum(axis=1)
    want = np_rloo(r, G) - lam * np_rloo(c, G) - kl_coef * np_rloo(seq_kl, G)
    np.testing.assert_allclose(np.asarray(advantages(lam)), want[:, None] * mask, atol=1e-5)
    w = rng.normal(size=(B, T))
    grad = jax.grad(lambda x: jnp.sum(w * advantages(x)))(jnp.float32(lam))
    np.testing.assert_allclose(float(grad), -np.sum(w * np_rloo(c, G)[:, None] * mask), rtol=1e-5)


@pytest.mark.parametrize(
    "lam, bound, want", [(0.5, 0.2, 0.52), (0.0, -0.3, 0.0), (0.01, -0.5, 0.0), (1.0, -1.0, 0.9)]
)
def test_multiplier_update_is_projected_gradient_ascent(lam, bound, want):
    got = constrained.update_multiplier(jnp.float32(lam), jnp.float32(bound), lr=0.1)
    np.testing.assert_allclose(float(got), max(0.0, lam + 0.1 * bound), atol=1e-7)
    np.testing.assert_allclose(float(got), want, atol=1e-7)
    grad = jax.grad(lambda g: constrained.update_multiplier(jnp.float32(lam), g, lr=0.1))
    assert float(grad(jnp.float32(bound))) == pytest.approx(0.1 if want > 0 else 0.0)
