"""Full-vocabulary KL(p || q) as Mosaic TPU Pallas kernels (forward, dh_p, dW_p).

Same layout as ``logprob/pallas_tpu.py``. Forward grid ``(token blocks "parallel", vocab tiles
"arbitrary")``: each step computes both logits tiles ``zp = h_p @ Wp``, ``zq = h_q @ Wq`` and folds
them into lane-dense online accumulators

    m_p, s_p, m_q, s_q (online logsumexp of each side),  A' = A e^{m_p - m_p'} + sum_j
    e^{zp_j - m_p'} (zp_j - zq_j),

so ``KL = A / s_p - lse_p + lse_q``. Backward (q is a constant) recomputes the tiles and

    dzp_j = g p_j (log p_j - log q_j - KL),  dh_p = dzp @ Wp^T,  dW_p = h_p^T @ dzp,

in a ``(token "parallel", vocab "arbitrary")`` kernel for dh_p and a ``(vocab "parallel", token
"arbitrary")`` kernel for dW_p. With a soft-cap c both tiles are ``c tanh(z / c)`` and
``dzp_j *= 1 - (zp_j / c)^2``.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float

from jaxalign.kernels import _softcap
from jaxalign.kernels.logprob.pallas_tpu import LANES, _blocks, _pad_rows, _params, _tile_logits

PerToken = Float[Array, "N"]
_KL, _LSE_P, _LSE_Q = 0, 1, 2  # lanes of the forward output / columns of the backward row stats
_ROW_STATS = 8  # backward per-row inputs: kl, lse_p, lse_q, g


def _fwd_kernel(
    hp_ref, wp_ref, hq_ref, wq_ref, out_ref, mp_sc, sp_sc, mq_sc, sq_sc, a_sc, *, vocab, tv, softcap
):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        for ref in (mp_sc, mq_sc):
            ref[...] = jnp.full(ref.shape, -jnp.inf, jnp.float32)
        for ref in (sp_sc, sq_sc, a_sc):
            ref[...] = jnp.zeros(ref.shape, jnp.float32)

    zp, _, valid, _ = _tile_logits(hp_ref[...], wp_ref, j, tv, vocab, softcap)
    zq, _, _, _ = _tile_logits(hq_ref[...], wq_ref, j, tv, vocab, softcap)
    mp_prev, mq_prev = mp_sc[...], mq_sc[...]
    mp_new = jnp.maximum(mp_prev, jnp.max(zp, axis=1, keepdims=True))
    mq_new = jnp.maximum(mq_prev, jnp.max(zq, axis=1, keepdims=True))
    alpha = jnp.exp(mp_prev - mp_new)
    ep = jnp.exp(zp - mp_new[:, :1])
    sp_sc[...] = alpha * sp_sc[...] + jnp.sum(ep, axis=1, keepdims=True)
    a_sc[...] = alpha * a_sc[...] + jnp.sum(
        jnp.where(valid, ep * (zp - zq), 0.0), axis=1, keepdims=True
    )
    sq_sc[...] = jnp.exp(mq_prev - mq_new) * sq_sc[...] + jnp.sum(
        jnp.exp(zq - mq_new[:, :1]), axis=1, keepdims=True
    )
    mp_sc[...], mq_sc[...] = mp_new, mq_new

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        lse_p = mp_sc[...] + jnp.log(sp_sc[...])
        lse_q = mq_sc[...] + jnp.log(sq_sc[...])
        lane = lax.broadcasted_iota(jnp.int32, out_ref.shape, 1)
        out = jnp.where(lane == _KL, a_sc[...] / sp_sc[...] - lse_p + lse_q, 0.0)
        out = jnp.where(lane == _LSE_P, lse_p, out)
        out_ref[...] = jnp.where(lane == _LSE_Q, lse_q, out)


def _dz(hp, wp_ref, hq_ref, wq_ref, rows, j, tv, vocab, softcap):
    zp, _, valid, wp = _tile_logits(hp, wp_ref, j, tv, vocab, softcap)
    zq, _, _, _ = _tile_logits(hq_ref[...], wq_ref, j, tv, vocab, softcap)
    logp = jnp.where(valid, zp - rows[:, 1:2], 0.0)
    logq = jnp.where(valid, zq - rows[:, 2:3], 0.0)
    p = jnp.where(valid, jnp.exp(logp), 0.0)
    dz = rows[:, 3:4] * p * (logp - logq - rows[:, 0:1])
    return _softcap.chain(dz, zp, softcap, valid), wp


def _dh_kernel(rows_ref, hp_ref, wp_ref, hq_ref, wq_ref, dh_ref, acc_sc, *, vocab, tv, softcap):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    dz, wp = _dz(hp_ref[...], wp_ref, hq_ref, wq_ref, rows_ref[...], j, tv, vocab, softcap)
    acc_sc[...] += lax.dot_general(
        dz.astype(wp.dtype), wp, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        dh_ref[...] = acc_sc[...].astype(dh_ref.dtype)


def _dw_kernel(
    rows_ref, hp_ref, hpt_ref, wp_ref, hq_ref, wq_ref, dw_ref, acc_sc, *, vocab, tv, softcap
):
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    dz, _ = _dz(hp_ref[...], wp_ref, hq_ref, wq_ref, rows_ref[...], j, tv, vocab, softcap)
    acc_sc[...] += jnp.dot(
        hpt_ref[...], dz.astype(hpt_ref.dtype), preferred_element_type=jnp.float32
    )

    @pl.when(i == pl.num_programs(1) - 1)
    def _finish():
        dw_ref[...] = acc_sc[...].astype(dw_ref.dtype)


def _specs(tn, tv, dp, dq, vocab_first):
    """BlockSpecs for (hp, wp, hq, wq); grid is (i, j) or, with ``vocab_first``, (j, i)."""

    def idx(f):
        return (lambda j, i: f(i, j)) if vocab_first else f

    return [
        pl.BlockSpec((tn, dp), idx(lambda i, j: (i, 0))),
        pl.BlockSpec((dp, tv), idx(lambda i, j: (0, j))),
        pl.BlockSpec((tn, dq), idx(lambda i, j: (i, 0))),
        pl.BlockSpec((dq, tv), idx(lambda i, j: (0, j))),
    ]


def _forward(hp, wp, hq, wq, block_size, softcap, interpret):
    (n, dp), dq, vocab = hp.shape, hq.shape[1], wp.shape[1]
    tn, tv, n_pad = _blocks(n, vocab, block_size, interpret)
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, vocab=vocab, tv=tv, softcap=softcap),
        out_shape=jax.ShapeDtypeStruct((n_pad, LANES), jnp.float32),
        grid=(n_pad // tn, pl.cdiv(vocab, tv)),
        in_specs=_specs(tn, tv, dp, dq, vocab_first=False),
        out_specs=pl.BlockSpec((tn, LANES), lambda i, j: (i, 0)),
        scratch_shapes=[pltpu.VMEM((tn, LANES), jnp.float32) for _ in range(5)],
        **_params(("parallel", "arbitrary"), interpret),
    )(_pad_rows(hp, n_pad), wp, _pad_rows(hq, n_pad), wq)[:n]
    return out[:, _KL], out[:, _LSE_P], out[:, _LSE_Q]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _kl(hp, wp, hq, wq, block_size, softcap, interpret):
    return _forward(hp, wp, hq, wq, block_size, softcap, interpret)[0]


def _kl_fwd(hp, wp, hq, wq, block_size, softcap, interpret):
    kl, lse_p, lse_q = _forward(hp, wp, hq, wq, block_size, softcap, interpret)
    return kl, (hp, wp, hq, wq, kl, lse_p, lse_q)


def _kl_bwd(block_size, softcap, interpret, res, g):
    hp, wp, hq, wq, kl, lse_p, lse_q = res
    (n, dp), dq, vocab = hp.shape, hq.shape[1], wp.shape[1]
    tn, tv, n_pad = _blocks(n, vocab, block_size, interpret)
    nt, nv = n_pad // tn, pl.cdiv(vocab, tv)
    zero = jnp.zeros_like(kl)
    rows = _pad_rows(jnp.stack([kl, lse_p, lse_q, g, zero, zero, zero, zero], axis=1), n_pad)
    hp_pad, hq_pad = _pad_rows(hp, n_pad), _pad_rows(hq, n_pad)
    static = dict(vocab=vocab, tv=tv, softcap=softcap)
    dh = pl.pallas_call(
        functools.partial(_dh_kernel, **static),
        out_shape=jax.ShapeDtypeStruct((n_pad, dp), hp.dtype),
        grid=(nt, nv),
        in_specs=[
            pl.BlockSpec((tn, _ROW_STATS), lambda i, j: (i, 0)),
            *_specs(tn, tv, dp, dq, vocab_first=False),
        ],
        out_specs=pl.BlockSpec((tn, dp), lambda i, j: (i, 0)),
        scratch_shapes=[pltpu.VMEM((tn, dp), jnp.float32)],
        **_params(("parallel", "arbitrary"), interpret),
    )(rows, hp_pad, wp, hq_pad, wq)[:n]
    specs = _specs(tn, tv, dp, dq, vocab_first=True)
    dw = pl.pallas_call(
        functools.partial(_dw_kernel, **static),
        out_shape=jax.ShapeDtypeStruct((dp, vocab), wp.dtype),
        grid=(nv, nt),
        in_specs=[
            pl.BlockSpec((tn, _ROW_STATS), lambda j, i: (i, 0)),
            specs[0],
            pl.BlockSpec((dp, tn), lambda j, i: (0, i)),
            *specs[1:],
        ],
        out_specs=pl.BlockSpec((dp, tv), lambda j, i: (0, j)),
        scratch_shapes=[pltpu.VMEM((dp, tv), jnp.float32)],
        **_params(("parallel", "arbitrary"), interpret),
    )(rows, hp_pad, hp_pad.T, wp, hq_pad, wq)
    return dh, dw, jnp.zeros_like(hq), jnp.zeros_like(wq)


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
    """Per-token KL(p || q) in float32 on TPU (``interpret=True``: anywhere); gradients to p;
    logits soft-capped by ``softcap``."""
    return _kl(hidden_p, unembedding_p, hidden_q, unembedding_q, block_size, softcap, interpret)
