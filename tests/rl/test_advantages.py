"""Advantages against float64 NumPy references written from the formulas (values and gradients),
on random inputs with random masks (full rows, rows that end early, empty rows, a row with a
hole), plus the failure modes: groups of size 1 and groups of equal rewards (zero std)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.rl import advantages as adv

B, T = 6, 9


def random_mask(rng, b=B, t=T):
    """Row 0 full, row 1 empty, row 2 with a hole, the others ending early at random."""
    mask = np.zeros((b, t))
    mask[0] = 1
    mask[2, :6] = 1
    mask[2, 3] = 0
    for row in range(3, b):
        mask[row, : rng.integers(1, t)] = 1
    return mask


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


def f32(x):
    return jnp.asarray(x, jnp.float32)


# --------------------------------------------------------------------------------------------------
# NumPy references.


def np_gae(rewards, values, mask, gamma, lam):
    out_adv, out_ret = np.zeros_like(rewards), np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = np.nonzero(mask[b])[0]  # the real tokens, in order
        a = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            next_v = values[b, idx[k + 1]] if k + 1 < len(idx) else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            a = delta + gamma * lam * a
            out_adv[b, t] = a
            out_ret[b, t] = a + values[b, t]
    return out_adv, out_ret


def np_group(rewards, g, scale, eps=1e-6):
    r = rewards.reshape(-1, g)
    centered = r - r.mean(axis=1, keepdims=True)
    if scale == "none":
        return centered.reshape(-1)
    if scale == "group":
        std = r.std(axis=1, ddof=1, keepdims=True) if g > 1 else np.zeros((r.shape[0], 1))
    else:
        std = rewards.std(ddof=1)
    return (centered / (std + eps)).reshape(-1)


def np_rloo(rewards, g):
    out = np.zeros_like(rewards)
    for i in range(len(rewards)):
        start = i // g * g
        others = [rewards[j] for j in range(start, start + g) if j != i]
        out[i] = rewards[i] - np.mean(others)
    return out


def np_shaped(rewards, kl, mask, kl_coef):
    out = -kl_coef * kl * mask
    for b in range(len(rewards)):
        idx = np.nonzero(mask[b])[0]
        if len(idx):
            out[b, idx[-1]] += rewards[b]
    return out


def np_rpp_returns(rewards, kl, mask, kl_coef, gamma):
    shaped = np_shaped(rewards, kl, mask, kl_coef)
    out = np.zeros_like(kl)
    for b in range(len(rewards)):
        running = 0.0
        for t in reversed(np.nonzero(mask[b])[0]):
            running = shaped[b, t] + gamma * running
            out[b, t] = running
    return out


def np_whiten(x, mask, shift_mean=True, eps=1e-8):
    vals = x[mask > 0]
    if len(vals) == 0:
        return np.zeros_like(x)
    mean = vals.mean()
    var = vals.var(ddof=1) if len(vals) > 1 else 0.0
    out = (x - mean) / np.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# --------------------------------------------------------------------------------------------------
# GAE.


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_numpy(gamma, lam):
    rng = np.random.default_rng(0)
    mask = random_mask(rng)
    rewards, values = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    got_adv, got_ret = jax.jit(functools.partial(adv.gae, gamma=gamma, lam=lam))(
        f32(rewards), f32(values), f32(mask)
    )
    want_adv, want_ret = np_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(got_adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_ret, want_ret, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(got_adv)[mask == 0]) and not np.any(np.asarray(got_ret)[mask == 0])


def test_gae_gradients_match_numpy():
    rng = np.random.default_rng(1)
    mask = random_mask(rng)
    rewards, values = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    w_a, w_r = rng.normal(size=(B, T)), rng.normal(size=(B, T))

    def jax_obj(r, v):
        a, ret = adv.gae(r, v, f32(mask), gamma=0.9, lam=0.8)
        return jnp.sum(a * w_a + ret * w_r)

    def np_obj(r, v):
        a, ret = np_gae(r, v, mask, 0.9, 0.8)
        return np.sum(a * w_a + ret * w_r)

    g_r, g_v = jax.grad(jax_obj, argnums=(0, 1))(f32(rewards), f32(values))
    np.testing.assert_allclose(g_r, fd_grad(lambda r: np_obj(r, values), rewards), atol=1e-5)
    np.testing.assert_allclose(g_v, fd_grad(lambda v: np_obj(rewards, v), values), atol=1e-5)


def test_gae_ignores_padding_contents():
    rng = np.random.default_rng(2)
    mask = random_mask(rng)
    rewards, values = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    junk = np.where(mask > 0, 0.0, 1e3)
    a1, r1 = adv.gae(f32(rewards), f32(values), f32(mask))
    a2, r2 = adv.gae(f32(rewards + junk), f32(values - junk), f32(mask))
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(r1, r2)


# --------------------------------------------------------------------------------------------------
# Group advantages (GRPO, Dr.GRPO) and RLOO.


@pytest.mark.parametrize("scale", adv.SCALES)
@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_group_advantages_match_numpy(scale, group_size):
    rng = np.random.default_rng(3)
    rewards = rng.normal(size=8)
    fn = jax.jit(functools.partial(adv.group_advantages, group_size=group_size, scale=scale))
    np.testing.assert_allclose(
        fn(f32(rewards)), np_group(rewards, group_size, scale), rtol=2e-5, atol=1e-6
    )


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_group_advantages_gradients(scale):
    rng = np.random.default_rng(4)
    rewards, w = rng.normal(size=8), rng.normal(size=8)
    got = jax.grad(lambda r: jnp.sum(adv.group_advantages(r, 4, scale=scale) * w))(f32(rewards))
    want = fd_grad(lambda r: np.sum(np_group(r, 4, scale) * w), rewards)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale", adv.SCALES)
def test_group_of_one_and_equal_rewards_give_zero_not_nan(scale):
    """Failure mode: a group of size 1 (std of one sample) or of equal rewards (std 0) divided
    by a zero std. The advantage is 0 and the gradient finite."""
    rewards = f32([0.3, -1.0, 2.0, 5.0])
    np.testing.assert_array_equal(adv.group_advantages(rewards, 1, scale=scale), 0.0)
    equal = f32([1.0, 1.0, 1.0, 0.0, 1.0, 0.5])
    got = adv.group_advantages(equal, 3, scale=scale)
    np.testing.assert_array_equal(got[:3], 0.0)
    assert np.all(np.isfinite(np.asarray(got)))
    for r in (rewards[:1], equal):
        g = jax.grad(lambda x: jnp.sum(adv.group_advantages(x, 1, scale=scale) ** 2))(r)
        assert np.all(np.isfinite(np.asarray(g)))
    g = jax.grad(lambda x: jnp.sum(adv.group_advantages(x, 3, scale=scale)))(equal)
    assert np.all(np.isfinite(np.asarray(g)))


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="group_size 3 does not divide the batch of 8"):
        adv.group_advantages(jnp.zeros(8), 3)
    with pytest.raises(ValueError, match="scale='std'"):
        adv.group_advantages(jnp.zeros(8), 2, scale="std")


@pytest.mark.parametrize("group_size", [2, 3])
def test_rloo_matches_numpy(group_size):
    rng = np.random.default_rng(5)
    rewards, w = rng.normal(size=6), rng.normal(size=6)
    fn = jax.jit(functools.partial(adv.rloo_advantages, group_size=group_size))
    np.testing.assert_allclose(fn(f32(rewards)), np_rloo(rewards, group_size), rtol=1e-5, atol=1e-6)
    got = jax.grad(lambda r: jnp.sum(fn(r) * w))(f32(rewards))
    np.testing.assert_allclose(
        got, fd_grad(lambda r: np.sum(np_rloo(r, group_size) * w), rewards), atol=1e-5
    )


def test_rloo_needs_two_per_group():
    with pytest.raises(ValueError, match="group_size >= 2.*got group_size=1"):
        adv.rloo_advantages(jnp.zeros(4), 1)
    with pytest.raises(ValueError, match="does not divide"):
        adv.rloo_advantages(jnp.zeros(5), 2)


# --------------------------------------------------------------------------------------------------
# KL-shaped rewards, REINFORCE++, whitening, token broadcast.


def test_kl_shaped_rewards_put_the_score_on_the_last_real_token():
    rng = np.random.default_rng(6)
    mask = random_mask(rng)
    rewards, kl = rng.normal(size=B), rng.normal(size=(B, T))
    got = adv.kl_shaped_rewards(f32(rewards), f32(kl), f32(mask), kl_coef=0.1)
    np.testing.assert_allclose(got, np_shaped(rewards, kl, mask, 0.1), rtol=1e-5, atol=1e-6)
    # the row that ends early gets its score on its EOS, the last token with mask 1
    row = 3
    last = int(np.nonzero(mask[row])[0][-1])
    assert np.isclose(float(got[row, last]), rewards[row] - 0.1 * kl[row, last], atol=1e-6)
    assert not np.any(np.asarray(got[1]))  # empty row: nothing


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_numpy(gamma):
    rng = np.random.default_rng(7)
    mask = random_mask(rng)
    rewards, kl = rng.normal(size=B), np.abs(rng.normal(size=(B, T)))
    kw = dict(kl_coef=0.05, gamma=gamma)
    want = np_rpp_returns(rewards, kl, mask, 0.05, gamma)
    got = jax.jit(functools.partial(adv.reinforce_pp_returns, **kw))(
        f32(rewards), f32(kl), f32(mask)
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    got_a = adv.reinforce_pp_advantages(f32(rewards), f32(kl), f32(mask), **kw)
    np.testing.assert_allclose(got_a, np_whiten(want, mask), rtol=1e-4, atol=1e-5)
    w = rng.normal(size=(B, T))
    g_r, g_kl = jax.grad(
        lambda r, k: jnp.sum(adv.reinforce_pp_returns(r, k, f32(mask), **kw) * w), argnums=(0, 1)
    )(f32(rewards), f32(kl))
    np_obj = lambda r, k: np.sum(np_rpp_returns(r, k, mask, 0.05, gamma) * w)  # noqa: E731
    np.testing.assert_allclose(g_r, fd_grad(lambda r: np_obj(r, kl), rewards), atol=1e-5)
    np.testing.assert_allclose(g_kl, fd_grad(lambda k: np_obj(rewards, k), kl), atol=1e-5)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_numpy(shift_mean):
    rng = np.random.default_rng(8)
    mask = random_mask(rng)
    x, w = rng.normal(size=(B, T)) * 3 + 1, rng.normal(size=(B, T))
    fn = functools.partial(adv.whiten, shift_mean=shift_mean)
    np.testing.assert_allclose(
        fn(f32(x), f32(mask)), np_whiten(x, mask, shift_mean), rtol=1e-5, atol=1e-5
    )
    got = jax.grad(lambda v: jnp.sum(fn(v, f32(mask)) * w))(f32(x))
    want = fd_grad(lambda v: np.sum(np_whiten(v, mask, shift_mean) * w), x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_whiten_degenerate_masks():
    x = f32(np.arange(12.0).reshape(2, 6))
    np.testing.assert_array_equal(adv.whiten(x, jnp.zeros((2, 6))), 0.0)
    one = jnp.zeros((2, 6)).at[1, 2].set(1.0)  # a single real token: centred to 0, no NaN
    np.testing.assert_array_equal(adv.whiten(x, one), 0.0)


def test_token_level():
    mask = random_mask(np.random.default_rng(9))
    a = np.arange(B, dtype=np.float64) - 2
    np.testing.assert_array_equal(adv.token_level(f32(a), f32(mask)), a[:, None] * mask)


def test_bfloat16_in_float32_out():
    rng = np.random.default_rng(10)
    mask = jnp.asarray(random_mask(rng), jnp.bfloat16)
    x = jnp.asarray(rng.normal(size=(B, T)), jnp.bfloat16)
    r = jnp.asarray(rng.normal(size=B), jnp.bfloat16)
    outs = [
        *adv.gae(x, x, mask),
        adv.group_advantages(r, 3),
        adv.rloo_advantages(r, 3),
        adv.kl_shaped_rewards(r, x, mask, kl_coef=0.1),
        adv.reinforce_pp_advantages(r, x, mask, kl_coef=0.1),
        adv.whiten(x, mask),
        adv.token_level(r, mask),
    ]
    assert all(o.dtype == jnp.float32 for o in outs)
