"""Choosing the next token from a row of logits: penalties, greedy, temperature, top-k / top-p /
min-p truncation and categorical sampling (semantics in `SamplingOptions`).

Every function is pure, works on ``[R, V]`` float32 rows and takes its options as traced scalars,
so one compiled decode loop serves every setting. Two choices keep the loop lean on every backend:

- Truncation never sorts the vocabulary (a ``[16, 32000]`` sort costs ~100 ms on a CPU, 30x a
  whole decode step). The k-th largest logit and the top-p cut-off are found by bisection over
  the 2^32 float32 bit patterns, ordered as integers (`sortable_keys`): 32 counting passes give
  the exact threshold. It runs only when top-k or top-p is on (``lax.cond``).
- Sampling is exact inverse-CDF sampling in two levels (`sample_categorical`): a block of 128
  tokens by the cumulative block masses, then a token inside the block. It needs two uniforms
  per row instead of V Gumbel draws (a third of the cost of ``jax.random.categorical`` here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

Logits = Float[Array, "R V"]
SAMPLE_BLOCK = 128  # tokens per block of the two-level sampler
_INT32_MIN = jnp.iinfo(jnp.int32).min
_INT32_MAX = jnp.iinfo(jnp.int32).max


def apply_penalties(
    logits: Logits,
    prompt_seen: Bool[Array, "R V"],
    completion_seen: Bool[Array, "R V"],
    repetition_penalty: Float[Array, ""],
    presence_penalty: Float[Array, ""],
) -> Logits:
    """CTRL repetition penalty r on tokens in the prompt or completion (HF rule: z / r if z > 0,
    else z * r), then the OpenAI presence penalty a on tokens in the completion: z - a."""
    penalised = jnp.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
    logits = jnp.where(prompt_seen | completion_seen, penalised, logits)
    return logits - presence_penalty * completion_seen


def sortable_keys(x: Float[Array, "..."]) -> Int[Array, "..."]:
    """int32 keys with ``key(a) < key(b)`` iff ``a < b`` for float32 a, b (not NaN); -0 < +0.

    Non-negative floats keep their bit pattern; negative ones flip every bit but the sign, which
    reverses their order while staying below every non-negative key.
    """
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _largest_key_where(
    keys: Int[Array, "R V"], enough, lo: Int[Array, " R"], hi: Int[Array, " R"]
) -> Int[Array, " R"]:
    """Per row, the largest key t in [lo, hi] with ``enough(keys >= t)`` True, for a predicate
    that is monotone (True at lo); 32 bisection steps over the int32 range."""

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + ((lo & 1) | (hi & 1))  # ceil((lo + hi) / 2), no overflow
        ok = enough(keys >= mid[:, None])
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = lax.fori_loop(0, 32, step, (lo, hi))
    return lo


def top_k_top_p_mask(
    logits: Logits, top_k: Int[Array, ""], top_p: Float[Array, ""]
) -> Bool[Array, "R V"]:
    """Tokens kept by top-k (0 = off) then top-p (1 = off) on the renormalised top-k
    distribution; ties with the last kept value are kept. ``logits`` are already divided by the
    temperature."""
    keys = sortable_keys(logits)
    R = logits.shape[0]
    lowest = jnp.full((R,), _INT32_MIN, jnp.int32)
    highest = jnp.max(keys, axis=-1)
    kth = lax.cond(
        top_k > 0,
        lambda: _largest_key_where(
            keys, lambda keep: jnp.sum(keep, axis=-1) >= top_k, lowest, highest
        ),
        lambda: lowest,
    )
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    probs = jnp.where(keys >= kth[:, None], probs, 0.0)
    target = top_p * jnp.sum(probs, axis=-1)
    cut = lax.cond(
        top_p < 1,
        lambda: _largest_key_where(
            keys, lambda keep: jnp.sum(jnp.where(keep, probs, 0.0), axis=-1) >= target, kth, highest
        ),
        lambda: kth,
    )
    return keys >= cut[:, None]


def min_p_mask(logits: Logits, min_p: Float[Array, ""]) -> Bool[Array, "R V"]:
    """Tokens with ``p_i >= min_p * max_j p_j``, i.e. ``z_i >= max_j z_j + log(min_p)``."""
    return logits >= jnp.max(logits, axis=-1, keepdims=True) + jnp.log(min_p)


def first_argmax(logits: Logits) -> Int[Array, " R"]:
    """Index of the largest logit, the lowest index among ties (like ``jnp.argmax``, but two
    plain reductions, several times faster than XLA's variadic argmax reduce on CPU)."""
    iota = lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    is_max = logits == jnp.max(logits, axis=-1, keepdims=True)
    return jnp.min(jnp.where(is_max, iota, logits.shape[-1]), axis=-1)


def sample_categorical(key: Array, logits: Logits) -> Int[Array, " R"]:
    """One token per row from ``softmax(logits)`` (``-inf`` = excluded), by inverse CDF in two
    levels: block b with probability mass(b) / total, then token j of b with p_j / mass(b).

    The uniforms are drawn in (0, 1], so a zero-probability token is never chosen.
    """
    R, V = logits.shape
    n_blocks = -(-V // SAMPLE_BLOCK)
    if n_blocks * SAMPLE_BLOCK != V:
        padding = ((0, 0), (0, n_blocks * SAMPLE_BLOCK - V))
        logits = jnp.pad(logits, padding, constant_values=-jnp.inf)
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    probs = probs.reshape(R, n_blocks, SAMPLE_BLOCK)
    u = 1.0 - jax.random.uniform(key, (R, 2), jnp.float32)
    block_cdf = jnp.cumsum(jnp.sum(probs, axis=-1), axis=-1)  # [R, n_blocks]
    block = jnp.sum(block_cdf < u[:, :1] * block_cdf[:, -1:], axis=-1)
    block = jnp.minimum(block, n_blocks - 1)
    inner = jnp.take_along_axis(probs, block[:, None, None], axis=1)[:, 0]  # [R, SAMPLE_BLOCK]
    inner_cdf = jnp.cumsum(inner, axis=-1)
    j = jnp.sum(inner_cdf < u[:, 1:] * inner_cdf[:, -1:], axis=-1)
    return block * SAMPLE_BLOCK + jnp.minimum(j, SAMPLE_BLOCK - 1)


def choose_tokens(
    key: Array,
    logits: Logits,
    prompt_seen: Bool[Array, "R V"],
    completion_seen: Bool[Array, "R V"],
    knobs: dict[str, Array],
) -> Int[Array, " R"]:
    """The next token of each row under the options in ``knobs`` (traced scalars:
    temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty)."""
    penalties_on = (knobs["repetition_penalty"] != 1) | (knobs["presence_penalty"] != 0)
    logits = lax.cond(
        penalties_on,
        lambda z: apply_penalties(
            z,
            prompt_seen,
            completion_seen,
            knobs["repetition_penalty"],
            knobs["presence_penalty"],
        ),
        lambda z: z,
        logits,
    )

    def sample(z):
        z = z / knobs["temperature"]
        truncate = (knobs["top_k"] > 0) | (knobs["top_p"] < 1)
        keep = lax.cond(
            truncate,
            lambda z: top_k_top_p_mask(z, knobs["top_k"], knobs["top_p"]),
            lambda z: jnp.ones(z.shape, bool),
            z,
        )
        keep = keep & min_p_mask(z, knobs["min_p"])
        return sample_categorical(key, jnp.where(keep, z, -jnp.inf))

    return lax.cond(knobs["temperature"] > 0, sample, first_argmax, logits)
