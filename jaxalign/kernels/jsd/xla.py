"""Vocab-blocked generalised JSD in plain XLA: never holds more than ``[N, block]`` logits.

Two passes over the vocab tiles, because the mixture m_j = b p_T_j + (1 - b) p_S_j needs both
normalisers before any ``log m_j`` can be formed, and ``log m_j`` is not a shift of the tile's
logits, so the online rescaling of ``token_kl`` (which only ever needs ``exp(z - max)``) cannot
fold it in one pass:

    pass 1: both log-normalisers lse_S, lse_T by an online logsumexp (as ``logprob/xla.py``);
    pass 2: per tile, log p = z - lse on both sides, log m = logaddexp(log b + log p_T,
            log(1 - b) + log p_S), and the sums of JSD_b and K_S = KL(p_S || m).

Backward (``jax.custom_vjp``; the teacher is constant, zero gradient) recomputes the tiles:

    d zS_j = g (1 - b) p_S_j (log p_S_j - log m_j - K_S)                 (0 < b < 1),
    d zS_j = g (p_S_j - p_T_j)                                           (b = 0, forward KL),
    d zS_j = g p_S_j (log p_S_j - log p_T_j - K_S), K_S = KL(p_S || p_T)  (b = 1, reverse KL),

from d JSD_b / d p_S_j = (1 - b)(log p_S_j - log m_j) through the softmax; then
dh_S += dz @ W_S_tile^T and dW_S[:, tile] = h_S^T dz.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxalign.kernels.jsd.reference import mixture_terms
from jaxalign.kernels.logprob.xla import accumulate_grads, fold_tiles, tile_logits

PerToken = Float[Array, "N"]


def _normalisers(hs, ws, ht, wt, block_size):
    def tile_stats(start, size):
        out = []
        for h, w in ((hs, ws), (ht, wt)):
            z, _ = tile_logits(h, w, start, size, None)
            m = jnp.max(z, axis=-1)
            out += [m, jnp.sum(jnp.exp(z - m[:, None]), axis=-1)]
        return tuple(out)

    def merge(carry, tile):
        (ms, ss, mt, st), (ms_t, ss_t, mt_t, st_t) = carry, tile
        ms_new, mt_new = jnp.maximum(ms, ms_t), jnp.maximum(mt, mt_t)
        ss = ss * jnp.exp(ms - ms_new) + ss_t * jnp.exp(ms_t - ms_new)
        st = st * jnp.exp(mt - mt_new) + st_t * jnp.exp(mt_t - mt_new)
        return ms_new, ss, mt_new, st

    ms, ss, mt, st = fold_tiles(ws.shape[1], block_size, tile_stats, merge)
    return ms + jnp.log(ss), mt + jnp.log(st)


def _log_probs(hs, ws, ht, wt, lse_s, lse_t, start, size):
    zs, ws_tile = tile_logits(hs, ws, start, size, None)
    zt, _ = tile_logits(ht, wt, start, size, None)
    return zs - lse_s[:, None], zt - lse_t[:, None], ws_tile


def _forward(hs, ws, ht, wt, beta, block_size):
    lse_s, lse_t = _normalisers(hs, ws, ht, wt, block_size)

    def tile_sums(start, size):
        logp_s, logp_t, _ = _log_probs(hs, ws, ht, wt, lse_s, lse_t, start, size)
        terms, student = mixture_terms(logp_s, logp_t, beta)
        k_s = jnp.zeros_like(lse_s) if student is None else jnp.sum(student, axis=-1)
        return jnp.sum(terms, axis=-1), k_s

    def add(carry, tile):
        return carry[0] + tile[0], carry[1] + tile[1]

    out, k_s = fold_tiles(ws.shape[1], block_size, tile_sums, add)
    return out, (lse_s, lse_t, k_s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _jsd(hs, ws, ht, wt, beta, block_size):
    return _forward(hs, ws, ht, wt, beta, block_size)[0]


def _jsd_fwd(hs, ws, ht, wt, beta, block_size):
    out, stats = _forward(hs, ws, ht, wt, beta, block_size)
    return out, (hs, ws, ht, wt, stats)


def _jsd_bwd(beta, block_size, res, g):
    hs, ws, ht, wt, (lse_s, lse_t, k_s) = res

    def tile_grads(start, size):
        logp_s, logp_t, ws_tile = _log_probs(hs, ws, ht, wt, lse_s, lse_t, start, size)
        p_s = jnp.exp(logp_s)
        if beta == 0.0:
            dz = p_s - jnp.exp(logp_t)
        elif beta == 1.0:
            dz = p_s * (logp_s - logp_t - k_s[:, None])
        else:
            log_m = jnp.logaddexp(jnp.log(beta) + logp_t, jnp.log1p(-beta) + logp_s)
            dz = (1.0 - beta) * p_s * (logp_s - log_m - k_s[:, None])
        dz = g[:, None] * dz
        dh = jnp.dot(dz.astype(ws_tile.dtype), ws_tile.T, preferred_element_type=jnp.float32)
        dw = jnp.dot(hs.T, dz.astype(hs.dtype), preferred_element_type=jnp.float32)
        return dh, dw

    dh, dw = accumulate_grads(ws.shape[1], block_size, tile_grads, ws.shape)
    return dh.astype(hs.dtype), dw.astype(ws.dtype), jnp.zeros_like(ht), jnp.zeros_like(wt)


_jsd.defvjp(_jsd_fwd, _jsd_bwd)


def jsd(
    hidden_s: Float[Array, "N Ds"],
    unembedding_s: Float[Array, "Ds V"],
    hidden_t: Float[Array, "N Dt"],
    unembedding_t: Float[Array, "Dt V"],
    *,
    beta: float,
    block_size: int | None = None,
) -> PerToken:
    """Per-token JSD_b in float32 with vocab tiles of ``block_size``; gradients to the student
    only. Memory O(N * block_size + D * V) in forward and backward."""
    return _jsd(hidden_s, unembedding_s, hidden_t, unembedding_t, float(beta), block_size)
