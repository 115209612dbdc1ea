"""Guided decoding (EFT, nudging, GenARM) on tiny random models against a direct reference: every
model's full forward on the generated prefix (right-padded, no cache), the method's formula in
float64 NumPy, then the greedy token and the per-step log-probs compared with what the loop
returned, on a left-padded batch of prompts of different lengths with n = 2 samples each."""

import jax
import numpy as np
import pytest

from jaxalign import models as M
from jaxalign.errors import ConfigError
from jaxalign.sampling import SamplingOptions, generate, guided, prompts_from_ids
from jaxalign.sampling.engine import _decode_loop

STEPS, N = 10, 2
PAD, EOS = 3, 393  # 393: a token the EFT rows emit, so some rows stop early
PROMPTS = [[1, 45, 12, 99, 7], [1, 300, 301], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
# float32 log-probs of combined distributions against float64: the loop's log_softmax of a
# combination (|l| up to ~60 here) rounds at up to 6.3e-6 (measured over these tests).
TOL = 1e-5
NEAR_TIE = 1e-5  # a greedy step whose two best combined log-probs are closer may go either way


def _model(seed, scale):
    """tiny-64 (V = 512) with its unembedding scaled: larger scale, peakier distributions."""
    config = M.get_preset("tiny-64")
    params = M.init_params(config, jax.random.key(seed))
    params["unembed"]["kernel"] = params["unembed"]["kernel"] * scale
    return config, params


@pytest.fixture(scope="module")
def models():
    # Scale 20 puts the top-1 probability of these models on both sides of nudging's 0.4.
    return [_model(seed, 20.0) for seed in range(4)]


_forward = jax.jit(M.forward, static_argnums=0)


def _reference_logprobs(model, result):
    """float64 log_softmax of the model's next-token logits before each generated token,
    [R, STEPS, V], from one right-padded full forward of prompt + completion (no cache)."""
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
    z = hidden @ np.asarray(M.unembedding(config, params), np.float64)
    return z - _logsumexp(z)


def _logsumexp(x):
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def _options(**kw):
    return SamplingOptions(**(dict(max_new_tokens=STEPS, n=N, eos_id=EOS, pad_id=PAD) | kw))


def _check(result, reference, base, temperature):
    """The loop's tokens and log-probs against the reference combined log-probs l [R, STEPS, V]
    and the first model's own log-probs ``base``; returns the number of greedy near-ties."""
    mask = np.arange(STEPS)[None] < result.lengths[:, None]
    y = np.where(mask, result.tokens, 0)[..., None]
    scaled = reference if temperature == 0 else reference / temperature
    expected = np.take_along_axis(scaled - _logsumexp(scaled), y, -1)[..., 0]
    np.testing.assert_allclose(result.logprobs, np.where(mask, expected, 0), atol=TOL, rtol=0)
    policy = np.take_along_axis(base, y, -1)[..., 0]
    np.testing.assert_allclose(result.policy_logprobs, np.where(mask, policy, 0), atol=TOL, rtol=0)
    if temperature > 0:
        return 0
    top2 = np.sort(reference, -1)[..., -2:]
    near = mask & (top2[..., 1] - top2[..., 0] < NEAR_TIE)
    # Up to a row's first near-tie, greedy must take the reference argmax.
    upto = np.cumsum(near, axis=1) == 0
    argmax = np.argmax(reference, -1)
    np.testing.assert_array_equal(
        np.where(mask & upto, result.tokens, -1), np.where(mask & upto, argmax, -1)
    )
    return int(near.sum())


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_eft_equals_the_renormalised_combination(models, temperature):
    large, tuned, small = models[:3]
    alpha = 1.5
    result = guided.eft(
        large,
        tuned,
        small,
        prompts_from_ids(PROMPTS, PAD),
        alpha=alpha,
        rng=jax.random.key(0),
        options=_options(temperature=temperature),
    )
    l_large, l_tuned, l_small = (_reference_logprobs(m, result) for m in (large, tuned, small))
    combined = l_large + alpha * (l_tuned - l_small)
    combined -= _logsumexp(combined)
    assert _check(result, combined, l_large, temperature) == 0
    assert (result.lengths < STEPS).any() and (result.lengths == STEPS).any()  # EOS and length


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_nudging_takes_the_aligned_token_where_the_base_is_unsure(models, temperature):
    base, aligned = models[0], models[1]
    gamma = 0.4
    result = guided.nudging(
        base,
        aligned,
        prompts_from_ids(PROMPTS, PAD),
        gamma=gamma,
        rng=jax.random.key(0),
        options=_options(temperature=temperature),
    )
    l_base, l_aligned = _reference_logprobs(base, result), _reference_logprobs(aligned, result)
    unsure = np.exp(l_base.max(-1)) < gamma
    combined = np.where(unsure[..., None], l_aligned, l_base)
    assert _check(result, combined, l_base, temperature) == 0
    mask = np.arange(STEPS)[None] < result.lengths[:, None]
    assert (unsure & mask).any() and (~unsure & mask).any()  # both models emitted tokens


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_genarm_equals_base_times_weighted_arms(models, temperature):
    base, arms = models[0], models[1:3]
    beta, weights = 2.0, (1.0, 0.5)
    result = guided.genarm(
        base,
        arms,
        prompts_from_ids(PROMPTS, PAD),
        beta=beta,
        weights=weights,
        rng=jax.random.key(0),
        options=_options(temperature=temperature),
    )
    l_base = _reference_logprobs(base, result)
    combined = l_base + sum(
        w / beta * _reference_logprobs(a, result) for w, a in zip(weights, arms, strict=True)
    )
    combined -= _logsumexp(combined)
    assert _check(result, combined, l_base, temperature) == 0


def test_limits_reduce_to_one_model(models):
    """alpha = 0 is the large base; nudging with gamma 0 is the base, with gamma > 1 the aligned
    model; greedy tokens equal `generate` of that model alone."""
    a, b, c = models[:3]
    prompts, rng, options = (
        prompts_from_ids(PROMPTS, PAD),
        jax.random.key(0),
        _options(temperature=0.0),
    )

    def alone(model):
        return generate(*model, prompts, rng=rng, options=options).tokens

    kw = dict(rng=rng, options=options)
    np.testing.assert_array_equal(guided.eft(a, b, c, prompts, alpha=0.0, **kw).tokens, alone(a))
    np.testing.assert_array_equal(guided.nudging(a, b, prompts, gamma=0.0, **kw).tokens, alone(a))
    np.testing.assert_array_equal(guided.nudging(a, b, prompts, gamma=1.1, **kw).tokens, alone(b))


def test_new_weights_never_recompile(models):
    a, b, c = models[:3]
    prompts, options = prompts_from_ids(PROMPTS, PAD), _options(temperature=0.7)
    guided.eft(a, b, c, prompts, alpha=1.0, rng=jax.random.key(0), options=options)
    size = _decode_loop._cache_size()
    for alpha in (0.5, 2.0):
        guided.eft(a, b, c, prompts, alpha=alpha, rng=jax.random.key(1), options=options)
    assert _decode_loop._cache_size() == size


def test_bad_input_is_named(models):
    a, b = models[:2]
    other = M.get_preset("tiny-64", vocab_size=640)
    wide = (other, M.init_params(other, jax.random.key(0)))
    prompts, kw = prompts_from_ids(PROMPTS, PAD), dict(rng=jax.random.key(0), options=_options())
    with pytest.raises(
        ConfigError,
        match=r"vocabulary sizes differ \(large_base: 512, "
        r"small_tuned: 640, small_base: 512",
    ):
        guided.eft(a, wide, b, prompts, **kw)
    with pytest.raises(ConfigError, match=r"arms\[1\]: 640"):
        guided.genarm(a, [b, wide], prompts, **kw)
    with pytest.raises(ConfigError, match="alpha=nan: expected a finite number"):
        guided.eft(a, b, a, prompts, alpha=float("nan"), **kw)
    with pytest.raises(ConfigError, match="gamma=-0.1"):
        guided.nudging(a, b, prompts, gamma=-0.1, **kw)
    with pytest.raises(ConfigError, match="beta=0.0: expected > 0"):
        guided.genarm(a, [b], prompts, beta=0.0, **kw)
    with pytest.raises(ConfigError, match="1 weights for 2 arms"):
        guided.genarm(a, [b, b], prompts, weights=[1.0], **kw)
    with pytest.raises(ConfigError, match="at least one"):
        guided.genarm(a, [], prompts, **kw)
