"""Vocab-blocked token log-probs in plain XLA: never holds more than ``[N, block]`` logits.

Forward: one pass over vocab tiles ``W[:, v0:v0+Vb]`` with an online logsumexp (Milakov &
Gimelshein, 2018, "Online normalizer calculation for softmax"): for each tile ``z = h @ W_tile``,

    m' = max(m, max_j z_j),  s' = s * exp(m - m') + sum_j exp(z_j - m'),
    a' = a * exp(m - m') + sum_j exp(z_j - m') z_j                      (entropy)
    q' = q * exp(2 (m - m')) + sum_j exp(2 (z_j - m'))                   (sum of squared probs)

and at the end ``lse = m + log s``, ``entropy = lse - a / s``, ``sum_sq = q / s^2``. The target
logit is a gather ``z_t = h . W[:, t]`` outside the loop. With a final-logit soft-cap c every
logit (tile and target) is ``c tanh(h . w / c)``.

Backward (``jax.custom_vjp``) recomputes each tile and never stores ``[N, V]``:

    d z_j = -g_lp p_j - g_ent p_j (log p_j + H) + 2 g_sq p_j (p_j - S)   (+ g_lp at j = t),
    (capped: d z_j *= 1 - (z_j / c)^2),   dh += dz @ W_tile^T,   dW[:, tile] = h^T @ dz.

All three outputs are exactly differentiable w.r.t. ``hidden`` and ``unembedding``.

With ``keep_logits`` (the CPU default when ``[N, V]`` fits a budget, see
``jaxalign.kernels.logprob``) the forward also writes every (capped) tile ``z`` into an ``[N, V]``
float32 residual and the backward reads the tiles back instead of recomputing them: three matmul
passes instead of four, O(N V) memory, the same arithmetic otherwise (identical results).

The ``V // Vb`` full tiles run in a ``fori_loop``; a ``V % Vb`` remainder tile, if any, is one
more static-size step, so W is never padded or copied and every dW tile is written exactly once
(in place, no read-modify-write of the ``[D, V]`` accumulator).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from jaxalign.kernels import _softcap

PerToken = Float[Array, "N"]
TokenIds = Int[Array, "N"]

DEFAULT_BLOCK_SIZE = 1024


def fold_tiles(vocab: int, block_size: int | None, tile_fn, merge_fn, seed=lambda tile: tile):
    """``merge_fn``-fold of ``tile_fn(start, size)`` over the vocab tiles of width ``block_size``.

    The first tile seeds the carry, ``seed(tile_fn(0, size))`` (rather than zeros), so carry
    types also hold inside shard_map.
    """
    vb = min(block_size or DEFAULT_BLOCK_SIZE, vocab)
    n_full, rem = divmod(vocab, vb)
    carry = seed(tile_fn(0, vb))
    carry = lax.fori_loop(1, n_full, lambda i, c: merge_fn(c, tile_fn(i * vb, vb)), carry)
    return merge_fn(carry, tile_fn(n_full * vb, rem)) if rem else carry


def accumulate_grads(vocab: int, block_size: int | None, grad_fn, dw_shape):
    """``(sum of dh tiles, dW)`` from ``grad_fn(start, size) -> (dh, dW[:, start:start+size])``.

    Every dW tile is written once, in place; the seed tile allocates dW (see ``fold_tiles``).
    """
    vb = min(block_size or DEFAULT_BLOCK_SIZE, vocab)
    n_full, rem = divmod(vocab, vb)

    def step(carry, start, size):
        dh, dw = carry
        dh_t, dw_t = grad_fn(start, size)
        return dh + dh_t, lax.dynamic_update_slice_in_dim(dw, dw_t, start, axis=1)

    dh, dw_t = grad_fn(0, vb)
    dw = lax.dynamic_update_slice_in_dim(jnp.zeros(dw_shape, jnp.float32), dw_t, 0, axis=1)
    carry = lax.fori_loop(1, n_full, lambda i, c: step(c, i * vb, vb), (dh, dw))
    return step(carry, n_full * vb, rem) if rem else carry


def tile_logits(hidden, unembedding, start, size, softcap):
    """``z = h @ W[:, start:start+size]`` in float32 (soft-capped), and the tile of W."""
    w_tile = lax.dynamic_slice_in_dim(unembedding, start, size, axis=1)
    z = jnp.dot(hidden, w_tile, preferred_element_type=jnp.float32)
    return _softcap.cap(z, softcap), w_tile


def _target_logit(hidden, unembedding, targets, softcap):
    w_t = jnp.take(unembedding, targets, axis=1)  # [D, N]
    z_t = jnp.sum(hidden.astype(jnp.float32) * w_t.T.astype(jnp.float32), axis=-1)
    return _softcap.cap(z_t, softcap)


def _forward(hidden, unembedding, targets, block_size, want_ent, want_sq, softcap, keep=False):
    """(logp, entropy, sum_sq, lse, logits): ``logits`` the ``[N, V]`` (capped) logits when
    ``keep``, written tile by tile as they are computed, else None."""

    def tile_stats(start, size):
        z, _ = tile_logits(hidden, unembedding, start, size, softcap)
        m = jnp.max(z, axis=-1)
        e = jnp.exp(z - m[:, None])
        a = jnp.sum(e * z, axis=-1) if want_ent else None
        q = jnp.sum(e * e, axis=-1) if want_sq else None
        return (m, jnp.sum(e, axis=-1), a, q), z

    def merge(carry, tile):
        (m, s, a, q), (m_t, s_t, a_t, q_t) = carry, tile
        m_new = jnp.maximum(m, m_t)
        old, new = jnp.exp(m - m_new), jnp.exp(m_t - m_new)
        a = a * old + a_t * new if want_ent else None
        q = q * old * old + q_t * new * new if want_sq else None
        return m_new, s * old + s_t * new, a, q

    vocab = unembedding.shape[1]
    if not keep:
        stats = fold_tiles(vocab, block_size, lambda start, size: tile_stats(start, size)[0], merge)
        logits = None
    else:

        def keep_tile(start, size):
            stats, z = tile_stats(start, size)
            return stats, (start, z)

        def write(buf, tile):
            start, z = tile
            return lax.dynamic_update_slice_in_dim(buf, z, start, axis=1)

        empty = jnp.zeros((hidden.shape[0], vocab), jnp.float32)
        stats, logits = fold_tiles(
            vocab,
            block_size,
            keep_tile,
            lambda carry, tile: (merge(carry[0], tile[0]), write(carry[1], tile[1])),
            seed=lambda tile: (tile[0], write(empty, tile[1])),
        )
    m, s, a, q = stats
    lse = m + jnp.log(s)
    logp = _target_logit(hidden, unembedding, targets, softcap) - lse
    entropy = lse - a / s if want_ent else None
    sum_sq = q / (s * s) if want_sq else None
    return logp, entropy, sum_sq, lse, logits


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _logprobs(hidden, unembedding, targets, block_size, want_ent, want_sq, softcap, keep):
    return _forward(hidden, unembedding, targets, block_size, want_ent, want_sq, softcap)[:3]


def _logprobs_fwd(hidden, unembedding, targets, block_size, want_ent, want_sq, softcap, keep):
    logp, entropy, sum_sq, lse, logits = _forward(
        hidden, unembedding, targets, block_size, want_ent, want_sq, softcap, keep
    )
    return (logp, entropy, sum_sq), (hidden, unembedding, targets, lse, entropy, sum_sq, logits)


def _logprobs_bwd(block_size, want_ent, want_sq, softcap, keep, res, cotangents):
    hidden, unembedding, targets, lse, entropy, sum_sq, logits = res
    g_lp, g_ent, g_sq = cotangents

    def tile_grads(start, size):
        if keep:
            z = lax.dynamic_slice_in_dim(logits, start, size, axis=1)
            w_tile = lax.dynamic_slice_in_dim(unembedding, start, size, axis=1)
        else:
            z, w_tile = tile_logits(hidden, unembedding, start, size, softcap)
        logp = z - lse[:, None]
        p = jnp.exp(logp)
        dz = -g_lp[:, None] * p
        if want_ent:
            dz = dz - g_ent[:, None] * p * (logp + entropy[:, None])
        if want_sq:
            dz = dz + 2.0 * g_sq[:, None] * p * (p - sum_sq[:, None])
        dz = _softcap.chain(dz, z, softcap)
        dh = jnp.dot(dz.astype(w_tile.dtype), w_tile.T, preferred_element_type=jnp.float32)
        dw = jnp.dot(hidden.T, dz.astype(hidden.dtype), preferred_element_type=jnp.float32)
        return dh, dw

    dh, dw = accumulate_grads(unembedding.shape[1], block_size, tile_grads, unembedding.shape)
    # One-hot part of d z: +g_lp at the target column (through the cap's slope there).
    g_t = _softcap.chain(g_lp, _target_logit(hidden, unembedding, targets, softcap), softcap)
    dh = dh + g_t[:, None] * jnp.take(unembedding, targets, axis=1).T.astype(jnp.float32)
    dw = dw.at[:, targets].add((g_t[:, None] * hidden.astype(jnp.float32)).T)
    return dh.astype(hidden.dtype), dw.astype(unembedding.dtype), None


_logprobs.defvjp(_logprobs_fwd, _logprobs_bwd)


def logprobs(
    hidden: Float[Array, "N D"],
    unembedding: Float[Array, "D V"],
    targets: TokenIds,
    *,
    return_entropy: bool = False,
    return_sum_sq: bool = False,
    block_size: int | None = None,
    softcap: float | None = None,
    keep_logits: bool = False,
) -> tuple[PerToken, PerToken | None, PerToken | None]:
    """Per-token ``(logp, entropy, sum_sq)`` in float32 with vocab tiles of ``block_size`` columns,
    logits soft-capped by ``softcap``.

    ``targets`` must lie in ``[0, V)``. Memory is O(N * block_size + D * V) in forward and backward,
    or with ``keep_logits`` O(N * V): the forward writes each logits tile into an ``[N, V]``
    residual and the backward reads it instead of recomputing it (three matmul passes, not four).
    """
    return _logprobs(
        hidden,
        unembedding,
        targets,
        block_size,
        return_entropy,
        return_sum_sq,
        softcap,
        keep_logits,
    )
