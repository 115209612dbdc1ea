"""KL controllers: the adaptive controller against a float64 NumPy walk of Ziegler et al.'s update
over many steps (jitted update), the fixed one unchanged, state checkpointable, bad config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.errors import ConfigError
from jaxalign.rl.kl_control import KLController, init_kl_controller, kl_coef, update_kl_controller


def np_walk(coef, target, horizon, kls, n_steps):
    coefs = []
    for kl, n in zip(kls, n_steps, strict=True):
        error = np.clip(kl / target - 1.0, -0.2, 0.2)
        coef *= 1.0 + error * n / horizon
        coefs.append(coef)
    return np.array(coefs)


def test_adaptive_matches_numpy_walk():
    rng = np.random.default_rng(0)
    steps = 300
    kls = rng.uniform(0.0, 15.0, size=steps)  # below, near and far above the target 6
    n_steps = rng.integers(8, 512, size=steps)
    controller, state = init_kl_controller("adaptive", coef=0.05, target=6.0, horizon=10_000)
    update = jax.jit(update_kl_controller, static_argnums=0)
    got = []
    for kl, n in zip(kls, n_steps, strict=True):
        state = update(controller, state, jnp.float32(kl), jnp.int32(n))
        got.append(float(kl_coef(state)))
        assert state["coef"].dtype == jnp.float32 and state["coef"].shape == ()
    want = np_walk(0.05, 6.0, 10_000, kls, n_steps)
    # float32: a few roundings per step, relative error <= 300 * 4 * 2^-24 ~ 7e-5 in the worst case
    np.testing.assert_allclose(got, want, rtol=7e-5)
    assert want.max() / want.min() > 1.5  # the walk moved the coefficient substantially


def test_adaptive_error_is_clipped():
    controller, state = init_kl_controller("adaptive", coef=1.0, target=2.0, horizon=100)
    up = update_kl_controller(controller, state, 1e6, 10)  # error clipped at +0.2
    down = update_kl_controller(controller, state, 0.0, 10)  # error -1 clipped at -0.2
    np.testing.assert_allclose(kl_coef(up), 1.02, rtol=1e-6)
    np.testing.assert_allclose(kl_coef(down), 0.98, rtol=1e-6)


def test_fixed_never_changes():
    controller, state = init_kl_controller("fixed", coef=0.1)
    for kl in (0.0, 5.0, 1e4):
        state = update_kl_controller(controller, state, kl, 64)
    assert float(kl_coef(state)) == np.float32(0.1)


def test_state_is_a_checkpointable_dict_and_controller_is_static():
    controller, state = init_kl_controller("adaptive", coef=0.2, target=3.0, horizon=50)
    assert set(state) == {"coef"} and isinstance(state["coef"], jax.Array)
    assert hash(controller) == hash(KLController("adaptive", 3.0, 50))
    leaves = jax.tree.leaves(state)
    assert all(x.dtype == jnp.float32 for x in leaves)


@pytest.mark.parametrize(
    "kind,kw,match",
    [
        ("adaptiv", dict(coef=0.1), "not one of fixed, adaptive"),
        ("adaptive", dict(coef=0.1, horizon=10), "needs target > 0"),
        ("adaptive", dict(coef=0.1, target=6.0, horizon=0), "needs horizon > 0"),
        ("fixed", dict(coef=0.1, target=6.0), "takes no target or horizon"),
        ("fixed", dict(coef=-1.0), "must be a number >= 0"),
    ],
)
def test_bad_config(kind, kw, match):
    with pytest.raises(ConfigError, match=match):
        init_kl_controller(kind, **kw)
