"""Token-level policy losses against float64 NumPy references (values and analytic gradients),
the clip edge cases (ratio exactly 1, asymmetric clip, dual clip, an all-padding row), the
micro-batch additivity of the aggregations, and the KL estimators' gradients by exact
expectation over a categorical (k1 as a loss term has zero expected gradient)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxalign.losses as L
from jaxalign.losses import policy

B, T = 6, 8


def random_mask(rng, b=B, t=T):
    """Row 0 full, row 1 empty (all padding), the others ending early at random."""
    mask = np.zeros((b, t))
    mask[0] = 1
    for row in range(2, b):
        mask[row, : rng.integers(1, t)] = 1
    return mask


def f32(x):
    return jnp.asarray(x, jnp.float32)


def inputs(seed, spread=0.3):
    rng = np.random.default_rng(seed)
    mask = random_mask(rng)
    old = rng.normal(size=(B, T)) - 2.0
    logps = old + rng.normal(size=(B, T)) * spread
    advantages = rng.normal(size=(B, T))
    return logps, old, advantages, mask


# --------------------------------------------------------------------------------------------------
# NumPy references: (token loss, d loss / d logps).


def np_clipped(logps, old, a, mask, clip_low, clip_high, dual_clip=None):
    ratio = np.exp(logps - old)
    loss, grad = np.zeros_like(logps), np.zeros_like(logps)
    for i in np.ndindex(logps.shape):
        r, adv = ratio[i], a[i]
        unclipped = -adv * r
        clipped = -adv * min(max(r, 1 - clip_low), 1 + clip_high)
        if clipped > unclipped:
            value, g = clipped, 0.0
        else:
            value, g = unclipped, -adv * r
        if dual_clip is not None and adv < 0 and -adv * dual_clip < value:
            value, g = -adv * dual_clip, 0.0
        loss[i], grad[i] = value * mask[i], g * mask[i]
    return loss, grad


def np_gspo(logps, old, a, mask, clip_low, clip_high):
    loss, grad = np.zeros_like(logps), np.zeros_like(logps)
    for b in range(logps.shape[0]):
        idx = np.nonzero(mask[b])[0]
        if not len(idx):
            continue
        s = np.exp(np.mean(logps[b, idx] - old[b, idx]))
        for t in idx:
            unclipped = -a[b, t] * s
            clipped = -a[b, t] * min(max(s, 1 - clip_low), 1 + clip_high)
            if clipped > unclipped:
                loss[b, t], grad[b, t] = clipped, 0.0
            else:  # d s_{i,t} / d logp_t = s_i (the token-level stop-gradient form)
                loss[b, t], grad[b, t] = unclipped, -a[b, t] * s
    return loss, grad


def np_aggregate(values, mask, mode, norm_length=None):
    lengths = mask.sum(axis=1)
    rows = float(np.sum(lengths > 0))
    total = np.sum(values * mask)
    if mode == "token-mean":
        return total, mask.sum()
    if mode == "seq-mean-token-sum":
        return total, rows
    if mode == "seq-mean-token-mean":
        per_row = [np.sum(values[b] * mask[b]) / lengths[b] for b in range(len(mask)) if lengths[b]]
        return float(np.sum(per_row)), rows
    return total, rows * norm_length


def np_value_loss(v, v_old, ret, mask, clip):
    loss, grad = np.zeros_like(v), np.zeros_like(v)
    for i in np.ndindex(v.shape):
        plain = 0.5 * (v[i] - ret[i]) ** 2
        value, g = plain, v[i] - ret[i]
        if clip is not None:
            vc = v_old[i] + min(max(v[i] - v_old[i], -clip), clip)
            clipped = 0.5 * (vc - ret[i]) ** 2
            if clipped > plain:
                inside = abs(v[i] - v_old[i]) < clip
                value, g = clipped, (vc - ret[i]) * inside
        loss[i], grad[i] = value * mask[i], g * mask[i]
    return loss, grad


# --------------------------------------------------------------------------------------------------
# Clipped policy loss.


CLIPS = [(0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.3, 1.5), (0.2, 0.2, 3.0)]


@pytest.mark.parametrize("clip_low,clip_high,dual_clip", CLIPS)
def test_clipped_policy_loss_matches_numpy(clip_low, clip_high, dual_clip):
    logps, old, a, mask = inputs(0, spread=0.5)
    logps[0, :2], a[0, :2] = old[0, :2] + 1.7, [-0.5, -1.5]  # ratio 5.5 with A < 0: dual clip
    kw = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
    fn = jax.jit(functools.partial(policy.clipped_policy_loss, **kw))
    loss, metrics = fn(f32(logps), f32(old), f32(a), f32(mask))
    want, want_grad = np_clipped(logps, old, a, mask, clip_low, clip_high, dual_clip)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda lp: jnp.sum(fn(lp, f32(old), f32(a), f32(mask))[0]))(f32(logps))
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
    ratio = np.exp(logps - old)
    np.testing.assert_allclose(metrics["ratio"], ratio * mask, rtol=1e-5)
    np.testing.assert_allclose(
        metrics["approx_kl"], (ratio - 1 - (logps - old)) * mask, rtol=1e-4, atol=1e-6
    )
    low = (ratio < 1 - clip_low) & (a < 0) & (mask > 0)
    high = (ratio > 1 + clip_high) & (a > 0) & (mask > 0)
    np.testing.assert_array_equal(metrics["clip_ratio/low"], low)
    np.testing.assert_array_equal(metrics["clip_ratio/high"], high)
    assert low.any() and high.any()  # the inputs exercise both clips
    if dual_clip is None:
        assert "clip_ratio/dual" not in metrics
    else:
        dual = (a < 0) & (ratio > dual_clip) & (mask > 0)
        np.testing.assert_array_equal(metrics["clip_ratio/dual"], dual)
        assert dual.any()


def test_ratio_one_is_plain_policy_gradient():
    """old == new (the first minibatch of a step): loss -A, gradient -A, nothing clipped."""
    _, old, a, mask = inputs(1)
    loss, metrics = policy.clipped_policy_loss(f32(old), f32(old), f32(a), f32(mask), dual_clip=3.0)
    np.testing.assert_array_equal(loss, np.float32(-a) * mask)
    grad = jax.grad(
        lambda lp: jnp.sum(policy.clipped_policy_loss(lp, f32(old), f32(a), f32(mask))[0])
    )(f32(old))
    np.testing.assert_allclose(grad, -a * mask, rtol=1e-6)
    for name in ("clip_ratio/low", "clip_ratio/high", "clip_ratio/dual", "approx_kl"):
        assert not np.any(np.asarray(metrics[name])), name
    np.testing.assert_array_equal(metrics["ratio"], mask)


def test_asymmetric_and_dual_clip_by_hand():
    """Hand-picked tokens: ratio 1.25 with A > 0 is clipped at 1.2 but not at clip_high 0.28;
    ratio 0.75 with A < 0 is clipped at 0.8; ratio 5 with A < 0 is bounded by the dual clip 3."""
    log_ratio = np.log([[1.25, 0.75, 5.0]])
    a = np.array([[1.0, -1.0, -2.0]])
    mask = np.ones((1, 3))
    args = (f32(log_ratio), f32(np.zeros((1, 3))), f32(a), f32(mask))

    def loss_and_grad(**kw):
        fn = lambda lp: policy.clipped_policy_loss(lp, *args[1:], **kw)[0]  # noqa: E731
        return np.asarray(fn(args[0])), np.asarray(jax.grad(lambda lp: jnp.sum(fn(lp)))(args[0]))

    loss, grad = loss_and_grad(clip_low=0.2, clip_high=0.2)
    np.testing.assert_allclose(loss, [[-1.2, 0.8, 10.0]], rtol=1e-6)
    np.testing.assert_allclose(grad, [[0.0, 0.0, 10.0]], rtol=1e-6)  # -A r for the unclipped
    loss, grad = loss_and_grad(clip_low=0.2, clip_high=0.28)
    np.testing.assert_allclose(loss, [[-1.25, 0.8, 10.0]], rtol=1e-6)
    np.testing.assert_allclose(grad, [[-1.25, 0.0, 10.0]], rtol=1e-6)
    loss, grad = loss_and_grad(clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    np.testing.assert_allclose(loss, [[-1.25, 0.8, 6.0]], rtol=1e-6)
    np.testing.assert_allclose(grad, [[-1.25, 0.0, 0.0]], rtol=1e-6)


def test_padding_rows_contribute_nothing():
    logps, old, a, mask = inputs(2)
    logps[1] = 50.0  # the all-padding row holds junk
    loss, metrics = policy.clipped_policy_loss(f32(logps), f32(old), f32(a), f32(mask))
    assert not np.any(np.asarray(loss[1]))
    assert all(not np.any(np.asarray(m[1])) for m in metrics.values())
    grad = jax.grad(
        lambda lp: jnp.sum(policy.clipped_policy_loss(lp, f32(old), f32(a), f32(mask))[0])
    )(f32(logps))
    assert not np.any(np.asarray(grad)[mask == 0])


def test_bad_hyperparameters():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="dual_clip=1.0"):
        policy.clipped_policy_loss(x, x, x, x, dual_clip=1.0)
    with pytest.raises(ValueError, match="clip_low=1.0"):
        policy.clipped_policy_loss(x, x, x, x, clip_low=1.0)


# --------------------------------------------------------------------------------------------------
# GSPO.


@pytest.mark.parametrize("clip_low,clip_high,spread", [(0.05, 0.08, 0.1), (3e-4, 4e-4, 1e-3)])
def test_gspo_matches_numpy(clip_low, clip_high, spread):
    logps, old, a, mask = inputs(3, spread=spread)
    kw = dict(clip_low=clip_low, clip_high=clip_high)
    fn = jax.jit(functools.partial(policy.gspo_policy_loss, **kw))
    loss, metrics = fn(f32(logps), f32(old), f32(a), f32(mask))
    want, want_grad = np_gspo(logps, old, a, mask, clip_low, clip_high)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda lp: jnp.sum(fn(lp, f32(old), f32(a), f32(mask))[0]))(f32(logps))
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
    clipped = np.asarray(metrics["clip_ratio/low"]) + np.asarray(metrics["clip_ratio/high"])
    assert 0 < clipped.sum() < mask.sum()  # some sequences clipped, some not


def test_gspo_token_form_gives_the_sequence_objective_gradient():
    """With a sequence advantage on its tokens and seq-mean-token-mean aggregation, the gradient of
    GSPO-token is that of mean_i max(-A_i s_i, -A_i clip(s_i)), d s_i / d logp_t = s_i / |y_i|."""
    logps, old, _, mask = inputs(4, spread=0.1)
    seq_a = np.random.default_rng(4).normal(size=B)
    clip_low, clip_high = 0.05, 0.08

    def objective(lp):
        token_a = jnp.where(f32(mask) > 0, f32(seq_a)[:, None], 0.0)
        loss, _ = policy.gspo_policy_loss(
            lp, f32(old), token_a, f32(mask), clip_low=clip_low, clip_high=clip_high
        )
        total, weight = policy.aggregate(loss, f32(mask), "seq-mean-token-mean")
        return total / weight

    want, rows = np.zeros((B, T)), np.sum(mask.sum(1) > 0)
    for b in range(B):
        n = mask[b].sum()
        if not n:
            continue
        s = np.exp(np.sum((logps[b] - old[b]) * mask[b]) / n)
        if -seq_a[b] * min(max(s, 1 - clip_low), 1 + clip_high) <= -seq_a[b] * s:  # unclipped
            want[b] = -seq_a[b] * s / n * mask[b] / rows
    np.testing.assert_allclose(jax.grad(objective)(f32(logps)), want, rtol=1e-5, atol=1e-7)
    assert np.count_nonzero(want.any(axis=1)) not in (0, B - 1)  # clipped and unclipped rows


# --------------------------------------------------------------------------------------------------
# Aggregation.


@pytest.mark.parametrize("mode", policy.AGGREGATIONS)
def test_aggregate_matches_numpy_and_adds_over_micro_batches(mode):
    rng = np.random.default_rng(5)
    mask = random_mask(rng, b=8)
    mask[5] = 0  # a second padding row
    values = rng.normal(size=(8, T))
    norm = T if mode == "seq-mean-token-sum-norm" else None
    fn = jax.jit(functools.partial(policy.aggregate, mode=mode, norm_length=norm))
    total, weight = fn(f32(values), f32(mask))
    want_total, want_weight = np_aggregate(values, mask, mode, norm)
    np.testing.assert_allclose(total, want_total, rtol=1e-5)
    np.testing.assert_allclose(weight, want_weight, rtol=1e-6)
    # micro-batches of 2 rows (one of them holds both padding rows after a permutation)
    order = np.array([1, 5, 0, 2, 3, 4, 6, 7])
    parts = [fn(f32(values[order[k : k + 2]]), f32(mask[order[k : k + 2]])) for k in range(0, 8, 2)]
    assert float(parts[0][0]) == 0 and float(parts[0][1]) == 0
    summed_total = sum(float(p[0]) for p in parts)
    summed_weight = sum(float(p[1]) for p in parts)
    np.testing.assert_allclose(summed_total / summed_weight, want_total / want_weight, rtol=1e-5)
    # gradient of loss_sum / weight: d / d l_bt, analytic
    grad = jax.grad(lambda v: fn(v, f32(mask))[0] / fn(v, f32(mask))[1])(f32(values))
    lengths = np.maximum(mask.sum(1, keepdims=True), 1)
    per_token = mask / lengths if mode == "seq-mean-token-mean" else mask
    np.testing.assert_allclose(grad, per_token / want_weight, rtol=1e-5, atol=1e-8)


def test_aggregate_bad_arguments():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="mode='mean'"):
        policy.aggregate(x, x, "mean")
    with pytest.raises(ValueError, match="norm_length .* is required"):
        policy.aggregate(x, x, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="norm_length"):
        policy.aggregate(x, x, "token-mean", norm_length=3)


# --------------------------------------------------------------------------------------------------
# Value loss and truncated importance sampling.


@pytest.mark.parametrize("clip", [0.2, None])
def test_value_loss_matches_numpy(clip):
    rng = np.random.default_rng(6)
    mask = random_mask(rng)
    v_old, ret = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    v = v_old + rng.normal(size=(B, T)) * 0.3
    fn = jax.jit(functools.partial(policy.value_loss, clip=clip))
    want, want_grad = np_value_loss(v, v_old, ret, mask, clip)
    np.testing.assert_allclose(
        fn(f32(v), f32(v_old), f32(ret), f32(mask)), want, rtol=1e-5, atol=1e-6
    )
    grad = jax.grad(lambda x: jnp.sum(fn(x, f32(v_old), f32(ret), f32(mask))))(f32(v))
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
    if clip is not None:  # the inputs exercise the clipped branch
        assert np.any((want_grad == 0) & (mask > 0))


def test_truncated_importance_weights():
    rng = np.random.default_rng(7)
    mask = random_mask(rng)
    old, sampler = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    old[0, 0], sampler[0, 0] = 0.0, -100.0  # exp overflows in float32 without the cap in log space
    fn = lambda o, s: policy.truncated_importance_weights(o, s, f32(mask), cap=2.0)  # noqa: E731
    want = np.minimum(np.exp(old - sampler), 2.0) * mask
    np.testing.assert_allclose(fn(f32(old), f32(sampler)), want, rtol=1e-5)
    assert 0 < np.sum(want == 2.0) < mask.sum()
    grads = jax.grad(lambda o, s: jnp.sum(fn(o, s)), argnums=(0, 1))(f32(old), f32(sampler))
    assert not any(np.any(np.asarray(g)) for g in grads)  # stop-gradient


def test_exported_from_jaxalign_losses():
    for name in policy.__all__:
        assert getattr(L, name) is getattr(policy, name) and name in L.__all__
    assert L.policy is policy
    from jaxalign import kernels

    assert policy.kl_k3 is kernels.kl_k3  # re-exported, not duplicated
    assert "clipped_policy_loss" not in L.LOSSES  # token-level: not in the sequence registry


# --------------------------------------------------------------------------------------------------
# KL estimators: gradients by exact expectation over a categorical (samples y ~ sg(pi)).


def _categorical(seed, v=7):
    rng = np.random.default_rng(seed)
    return rng.normal(size=v) * 0.7, rng.normal(size=v) * 0.7  # policy, reference logits


def _np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _expected(theta, estimator, ref_logits, in_reward=False):
    """E_{y ~ sg(pi)}[k(y)] as a loss term, or E[sg(k(y)) log pi(y)] with k in the reward."""
    logp = jax.nn.log_softmax(theta)
    ref = jax.nn.log_softmax(f32(ref_logits))
    p = jax.lax.stop_gradient(jnp.exp(logp))
    k = estimator(logp, ref)
    if in_reward:
        return jnp.sum(p * jax.lax.stop_gradient(k) * logp)
    return jnp.sum(p * k)


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_kl_estimator_gradients(seed):
    theta, ref_logits = _categorical(seed)
    pi, ref = _np_softmax(theta), _np_softmax(ref_logits)
    d = np.log(pi) - np.log(ref)
    reverse_kl = np.sum(pi * d)
    grad_reverse = pi * (d - reverse_kl)  # d KL(pi || ref) / d theta
    grad_forward = pi - ref  # d KL(ref || pi) / d theta
    assert np.max(np.exp(-d) - 1 + d) < 10 and np.abs(d).max() < 10  # no clamp is active
    # the gradients to tell apart are far larger than the tolerance (2e-6)
    assert min(np.linalg.norm(grad_reverse), np.linalg.norm(grad_forward - grad_reverse)) > 0.02

    def grad(estimator, **kw):
        return np.asarray(jax.grad(_expected)(f32(theta), estimator, ref_logits, **kw))

    # k1 as a loss term: zero expected gradient, although the KL gradient is not zero
    np.testing.assert_allclose(grad(policy.kl_k1), 0.0, atol=1e-6)
    # k1 in the reward (score function): the reverse-KL gradient
    np.testing.assert_allclose(grad(policy.kl_k1, in_reward=True), grad_reverse, atol=2e-6)
    # k2 as a loss term: the reverse-KL gradient
    np.testing.assert_allclose(grad(policy.kl_k2), grad_reverse, atol=2e-6)
    # k3 as a loss term: the forward-KL gradient, not the reverse one
    np.testing.assert_allclose(grad(policy.kl_k3), grad_forward, atol=2e-6)
    # values: k1 and k3 are unbiased for KL(pi || ref), k2 is not
    for est in (policy.kl_k1, policy.kl_k3):
        np.testing.assert_allclose(_expected(f32(theta), est, ref_logits), reverse_kl, rtol=1e-5)
    k2 = _expected(f32(theta), policy.kl_k2, ref_logits)
    np.testing.assert_allclose(k2, np.sum(pi * d**2 / 2), rtol=1e-5)  # biased: not reverse_kl


def test_bfloat16_in_float32_out():
    logps, old, a, mask = (jnp.asarray(x, jnp.bfloat16) for x in inputs(8))
    outs = [
        *policy.clipped_policy_loss(logps, old, a, mask, dual_clip=3.0)[0:1],
        *policy.clipped_policy_loss(logps, old, a, mask)[1].values(),
        *policy.gspo_policy_loss(logps, old, a, mask)[0:1],
        *policy.aggregate(logps, mask, "token-mean"),
        policy.value_loss(logps, old, a, mask),
        policy.truncated_importance_weights(logps, old, mask),
    ]
    assert all(x.dtype == jnp.float32 for x in outs)
