"""Full-vocabulary KL(p || q) as Pallas Triton (GPU) kernels (forward, dh_p, dW_p).

Same layout as ``logprob/pallas_gpu.py``. Forward grid ``(N / Tn, V / Tv)``: each program computes
both logits tiles and writes per-row partials of its tile,

    m_p, s_p = sum_j e^{zp_j - m_p}, m_q, s_q, a = sum_j e^{zp_j - m_p} (zp_j - zq_j),

merged in XLA (``KL = A / S_p - lse_p + lse_q`` after rescaling to the global maxima). Backward
(q is a constant) recomputes the tiles and ``dzp_j = g p_j (log p_j - log q_j - KL)``: grid
``(N / Tn,)`` accumulates ``dh_p[rows] += dzp @ Wp^T``; grid ``(V / Tv,)`` accumulates
``dW_p[:, cols] += h_p^T @ dzp``; each program owns its outputs (no atomics). With a soft-cap c
both tiles are ``c tanh(z / c)`` and ``dzp_j *= 1 - (zp_j / c)^2``.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float

from jaxalign.kernels import _softcap
from jaxalign.kernels.logprob.pallas_gpu import _blocks, _call, _index, _load2, _logits

PerToken = Float[Array, "N"]


def _both_logits(hp_ref, wp_ref, hq_ref, wq_ref, rs, rmask, cs, cmask, tn, tv, td, softcap):
    """Both (soft-capped) logits tiles, columns past V at -inf."""
    zp = _softcap.cap(_logits(hp_ref, wp_ref, rs, rmask, cs, cmask, tn, tv, td), softcap)
    zq = _softcap.cap(_logits(hq_ref, wq_ref, rs, rmask, cs, cmask, tn, tv, td), softcap)
    return jnp.where(cmask[None, :], zp, -jnp.inf), jnp.where(cmask[None, :], zq, -jnp.inf)


def _fwd_kernel(hp_ref, wp_ref, hq_ref, wq_ref, *part_refs, tn, tv, td, softcap):
    n, vocab = hp_ref.shape[0], wp_ref.shape[1]
    i, j = pl.program_id(0), pl.program_id(1)
    rs, _, rmask = _index(i * tn, tn, n)
    cs, _, cmask = _index(j * tv, tv, vocab)
    zp, zq = _both_logits(hp_ref, wp_ref, hq_ref, wq_ref, rs, rmask, cs, cmask, tn, tv, td, softcap)
    mp, mq = jnp.max(zp, axis=1), jnp.max(zq, axis=1)
    ep = jnp.exp(zp - mp[:, None])
    stats = (
        mp,
        jnp.sum(ep, axis=1),
        mq,
        jnp.sum(jnp.exp(zq - mq[:, None]), axis=1),
        jnp.sum(jnp.where(cmask[None, :], ep * (zp - zq), 0.0), axis=1),
    )
    for ref, x in zip(part_refs, stats, strict=True):
        plgpu.store(ref.at[j, rs], x, mask=rmask)


def _dz(hp_ref, wp_ref, hq_ref, wq_ref, rows_refs, rs, rmask, cs, cmask, tn, tv, td, softcap):
    kl, lse_p, lse_q, g = (plgpu.load(r.at[rs], mask=rmask, other=0.0)[:, None] for r in rows_refs)
    zp, zq = _both_logits(hp_ref, wp_ref, hq_ref, wq_ref, rs, rmask, cs, cmask, tn, tv, td, softcap)
    logp = jnp.where(cmask[None, :], zp - lse_p, 0.0)
    logq = jnp.where(cmask[None, :], zq - lse_q, 0.0)
    p = jnp.where(cmask[None, :], jnp.exp(logp), 0.0)
    return _softcap.chain(g * p * (logp - logq - kl), zp, softcap, cmask[None, :])


def _dh_kernel(hp_ref, wp_ref, hq_ref, wq_ref, *refs, tn, tv, td, softcap):
    *rows_refs, dh_ref = refs
    (n, d), vocab = hp_ref.shape, wp_ref.shape[1]
    rs, _, rmask = _index(pl.program_id(0) * tn, tn, n)

    def zero(k, _):
        ds, _, dmask = _index(k * td, td, d)
        plgpu.store(
            dh_ref.at[rs, ds],
            jnp.zeros((tn, td), jnp.float32),
            mask=rmask[:, None] & dmask[None, :],
        )

    lax.fori_loop(0, pl.cdiv(d, td), zero, None)

    def vocab_tile(j, _):
        cs, _, cmask = _index(j * tv, tv, vocab)
        dz = _dz(
            hp_ref, wp_ref, hq_ref, wq_ref, rows_refs, rs, rmask, cs, cmask, tn, tv, td, softcap
        )
        dz = dz.astype(wp_ref.dtype)

        def d_chunk(k, _):
            ds, _, dmask = _index(k * td, td, d)
            wb = _load2(wp_ref, ds, dmask, cs, cmask)
            upd = lax.dot_general(
                dz, wb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )
            mask = rmask[:, None] & dmask[None, :]
            cur = plgpu.load(dh_ref.at[rs, ds], mask=mask, other=0.0)
            plgpu.store(dh_ref.at[rs, ds], cur + upd, mask=mask)

        lax.fori_loop(0, pl.cdiv(d, td), d_chunk, None)

    lax.fori_loop(0, pl.cdiv(vocab, tv), vocab_tile, None)


def _dw_kernel(hp_ref, wp_ref, hq_ref, wq_ref, *refs, tn, tv, td, softcap):
    *rows_refs, dw_ref = refs
    (n, d), vocab = hp_ref.shape, wp_ref.shape[1]
    cs, _, cmask = _index(pl.program_id(0) * tv, tv, vocab)

    def zero(k, _):
        ds, _, dmask = _index(k * td, td, d)
        plgpu.store(
            dw_ref.at[ds, cs],
            jnp.zeros((td, tv), jnp.float32),
            mask=dmask[:, None] & cmask[None, :],
        )

    lax.fori_loop(0, pl.cdiv(d, td), zero, None)

    def token_block(i, _):
        rs, _, rmask = _index(i * tn, tn, n)
        dz = _dz(
            hp_ref, wp_ref, hq_ref, wq_ref, rows_refs, rs, rmask, cs, cmask, tn, tv, td, softcap
        )
        dz = dz.astype(hp_ref.dtype)

        def d_chunk(k, _):
            ds, _, dmask = _index(k * td, td, d)
            hb = _load2(hp_ref, rs, rmask, ds, dmask)
            upd = lax.dot_general(
                hb, dz, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )
            mask = dmask[:, None] & cmask[None, :]
            cur = plgpu.load(dw_ref.at[ds, cs], mask=mask, other=0.0)
            plgpu.store(dw_ref.at[ds, cs], cur + upd, mask=mask)

        lax.fori_loop(0, pl.cdiv(d, td), d_chunk, None)

    lax.fori_loop(0, pl.cdiv(n, tn), token_block, None)


def _plan(hp, hq, wp, block_size):
    (n, dp), dq, vocab = hp.shape, hq.shape[1], wp.shape[1]
    return _blocks(n, max(dp, dq), vocab, block_size)


def _forward(hp, wp, hq, wq, block_size, softcap, interpret):
    n, vocab = hp.shape[0], wp.shape[1]
    tn, tv, td = _plan(hp, hq, wp, block_size)
    nv = pl.cdiv(vocab, tv)
    mp, sp, mq, sq, a = _call(
        functools.partial(_fwd_kernel, tn=tn, tv=tv, td=td, softcap=softcap),
        [jax.ShapeDtypeStruct((nv, n), jnp.float32)] * 5,
        (pl.cdiv(n, tn), nv),
        interpret,
    )(hp, wp, hq, wq)
    big_p, big_q = jnp.max(mp, axis=0), jnp.max(mq, axis=0)
    scale_p = jnp.exp(mp - big_p)
    s_p = jnp.sum(sp * scale_p, axis=0)
    lse_p = big_p + jnp.log(s_p)
    lse_q = big_q + jnp.log(jnp.sum(sq * jnp.exp(mq - big_q), axis=0))
    return jnp.sum(a * scale_p, axis=0) / s_p - lse_p + lse_q, lse_p, lse_q


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _kl(hp, wp, hq, wq, block_size, softcap, interpret):
    return _forward(hp, wp, hq, wq, block_size, softcap, interpret)[0]


def _kl_fwd(hp, wp, hq, wq, block_size, softcap, interpret):
    kl, lse_p, lse_q = _forward(hp, wp, hq, wq, block_size, softcap, interpret)
    return kl, (hp, wp, hq, wq, kl, lse_p, lse_q)


def _kl_bwd(block_size, softcap, interpret, res, g):
    hp, wp, hq, wq, kl, lse_p, lse_q = res
    (n, dp), vocab = hp.shape, wp.shape[1]
    tn, tv, td = _plan(hp, hq, wp, block_size)
    static = dict(tn=tn, tv=tv, td=td, softcap=softcap)
    args = (hp, wp, hq, wq, kl, lse_p, lse_q, g)
    dh = _call(
        functools.partial(_dh_kernel, **static),
        jax.ShapeDtypeStruct((n, dp), jnp.float32),
        (pl.cdiv(n, tn),),
        interpret,
    )(*args)
    dw = _call(
        functools.partial(_dw_kernel, **static),
        jax.ShapeDtypeStruct((dp, vocab), jnp.float32),
        (pl.cdiv(vocab, tv),),
        interpret,
    )(*args)
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
    interpret: bool = False,
) -> PerToken:
    """Per-token KL(p || q) in float32 on GPU (``interpret=True``: anywhere); gradients to p;
    logits soft-capped by ``softcap``."""
    return _kl(hidden_p, unembedding_p, hidden_q, unembedding_q, block_size, softcap, interpret)
