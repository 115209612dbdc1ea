"""Vocab-blocked full-vocabulary KL(p || q) in plain XLA: never holds more than ``[N, block]``.

Forward, over vocab tiles with online normalisers (as in ``logprob/xla.py``) for both sides plus

    A' = A * exp(m_p - m_p') + sum_j exp(zp_j - m_p') (zp_j - zq_j),

so that ``KL = A / s_p - lse_p + lse_q``. Backward (``jax.custom_vjp``; the q side is treated as
constant and gets zero gradient) recomputes the tiles:

    d zp_j = g p_j (log p_j - log q_j - KL),  dh_p += dzp @ Wp_tile^T,  dW_p[:, tile] = h_p^T dzp.

With a soft-cap c both sides' tiles are ``c tanh(z / c)`` and ``d zp_j *= 1 - (zp_j / c)^2``.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxalign.kernels import _softcap
from jaxalign.kernels.logprob.xla import accumulate_grads, fold_tiles, tile_logits

PerToken = Float[Array, "N"]


def _forward(hp, wp, hq, wq, block_size, softcap):
    def tile_stats(start, size):
        zp, _ = tile_logits(hp, wp, start, size, softcap)
        zq, _ = tile_logits(hq, wq, start, size, softcap)
        mp, mq = jnp.max(zp, axis=-1), jnp.max(zq, axis=-1)
        ep = jnp.exp(zp - mp[:, None])
        sq = jnp.sum(jnp.exp(zq - mq[:, None]), axis=-1)
        return mp, jnp.sum(ep, axis=-1), mq, sq, jnp.sum(ep * (zp - zq), axis=-1)

    def merge(carry, tile):
        (mp, sp, mq, sq, a), (mp_t, sp_t, mq_t, sq_t, a_t) = carry, tile
        mp_new, mq_new = jnp.maximum(mp, mp_t), jnp.maximum(mq, mq_t)
        old, new = jnp.exp(mp - mp_new), jnp.exp(mp_t - mp_new)
        sq = sq * jnp.exp(mq - mq_new) + sq_t * jnp.exp(mq_t - mq_new)
        return mp_new, sp * old + sp_t * new, mq_new, sq, a * old + a_t * new

    mp, sp, mq, sq, a = fold_tiles(wp.shape[1], block_size, tile_stats, merge)
    lse_p, lse_q = mp + jnp.log(sp), mq + jnp.log(sq)
    return a / sp - lse_p + lse_q, lse_p, lse_q


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _kl(hp, wp, hq, wq, block_size, softcap):
    return _forward(hp, wp, hq, wq, block_size, softcap)[0]


def _kl_fwd(hp, wp, hq, wq, block_size, softcap):
    kl, lse_p, lse_q = _forward(hp, wp, hq, wq, block_size, softcap)
    return kl, (hp, wp, hq, wq, kl, lse_p, lse_q)


def _kl_bwd(block_size, softcap, res, g):
    hp, wp, hq, wq, kl, lse_p, lse_q = res

    def tile_grads(start, size):
        zp, wp_tile = tile_logits(hp, wp, start, size, softcap)
        zq, _ = tile_logits(hq, wq, start, size, softcap)
        logp, logq = zp - lse_p[:, None], zq - lse_q[:, None]
        dz = g[:, None] * jnp.exp(logp) * (logp - logq - kl[:, None])
        dz = _softcap.chain(dz, zp, softcap)
        dh = jnp.dot(dz.astype(wp_tile.dtype), wp_tile.T, preferred_element_type=jnp.float32)
        dw = jnp.dot(hp.T, dz.astype(hp.dtype), preferred_element_type=jnp.float32)
        return dh, dw

    dh, dw = accumulate_grads(wp.shape[1], block_size, tile_grads, wp.shape)
    return dh.astype(hp.dtype), dw.astype(wp.dtype), jnp.zeros_like(hq), jnp.zeros_like(wq)


_kl.defvjp(_kl_fwd, _kl_bwd)


def kl(
    hidden_p: Float[Array, "N Dp"],
    unembedding_p: Float[Array, "Dp V"],
    hidden_q: Float[Array, "N Dq"],
    unembedding_q: Float[Array, "Dq V"],
    *,
    block_size: int | None = None,
    softcap: float | None = None,
) -> PerToken:
    """Per-token KL(p || q) in float32 with vocab tiles of ``block_size``, logits soft-capped by
    ``softcap``; gradients to p only."""
    return _kl(hidden_p, unembedding_p, hidden_q, unembedding_q, block_size, softcap)
