"""Multi-objective reward-model regression and directional rewards (DPA, Wang et al. 2024)
against float64 NumPy written from METHODS.md: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxalign.losses as L


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def np_multi_objective_mse(rewards, ratings):
    """(1/k) sum_j (r_j - s_j)^2 per example."""
    k = rewards.shape[1]
    return np.array(
        [
            sum((r[j] - s[j]) ** 2 for j in range(k)) / k
            for r, s in zip(rewards, ratings, strict=True)
        ]
    )


def np_multi_objective_mse_grad(rewards, ratings):
    """d/dr_j of sum_b loss_b = 2 (r_j - s_j) / k (hand-derived)."""
    return 2.0 * (rewards - ratings) / rewards.shape[1]


def finite_diff(f, x, h=1e-6):
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += h
        minus[idx] -= h
        grad[idx] = (f(plus).sum() - f(minus).sum()) / (2 * h)
    return grad


@pytest.mark.parametrize("k", [1, 2, 5])
def test_multi_objective_mse_values_and_grads_match_numpy(k):
    rng = np.random.default_rng(k)
    rewards, ratings = rng.normal(size=(6, k)), rng.uniform(-1.0, 4.0, size=(6, k))
    loss, metrics = L.call(
        "multi_objective_mse", {"rewards": jnp.asarray(rewards), "ratings": jnp.asarray(ratings)}
    )
    assert loss.shape == (6,) and loss.dtype == jnp.float64
    np.testing.assert_allclose(
        np.asarray(loss), np_multi_objective_mse(rewards, ratings), rtol=1e-12, atol=1e-14
    )
    for j in range(k):
        np.testing.assert_allclose(
            np.asarray(metrics[f"rewards/mse_{j}"]),
            (rewards[:, j] - ratings[:, j]) ** 2,
            rtol=1e-12,
        )
    np.testing.assert_allclose(
        np.asarray(metrics["rewards/mae"]), np.abs(rewards - ratings).mean(axis=1), rtol=1e-12
    )

    grad = jax.grad(lambda r: L.multi_objective_mse(r, jnp.asarray(ratings))[0].sum())(
        jnp.asarray(rewards)
    )
    np.testing.assert_allclose(
        np.asarray(grad), np_multi_objective_mse_grad(rewards, ratings), rtol=1e-12, atol=1e-14
    )
    fd = finite_diff(lambda r: np_multi_objective_mse(r, ratings), rewards)
    np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-6, atol=1e-8)


def test_multi_objective_mse_averages_over_objectives():
    """The documented choice: the mean over the k objectives, not the sum (a loss that does not
    grow with k): one objective off by 2 of four gives 4 / 4 = 1."""
    loss, _ = L.multi_objective_mse(jnp.array([[2.0, 0.0, 0.0, 0.0]]), jnp.zeros((1, 4)))
    assert float(loss[0]) == pytest.approx(1.0)


def test_directional_reward_is_the_dot_product_with_the_unit_direction():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(5, 3))
    v = np.array(L.unit_direction([3.0, 0.0, 4.0]))
    np.testing.assert_allclose(v, [0.6, 0.0, 0.8], rtol=1e-15)
    got = L.directional_reward(jnp.asarray(rewards), jnp.asarray(v))
    want = np.array([sum(r[j] * v[j] for j in range(3)) for r in rewards])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)
    grad = jax.grad(lambda r: L.directional_reward(r, jnp.asarray(v)).sum())(jnp.asarray(rewards))
    np.testing.assert_allclose(np.asarray(grad), np.broadcast_to(v, (5, 3)), rtol=1e-12)


@pytest.mark.parametrize(
    ("direction", "match"),
    [([0.0, 0.0], "is zero"), ([], "non-empty"), ([1.0, float("nan")], "finite")],
)
def test_unit_direction_refuses_a_direction_that_points_nowhere(direction, match):
    with pytest.raises(ValueError, match=match):
        L.unit_direction(direction)
