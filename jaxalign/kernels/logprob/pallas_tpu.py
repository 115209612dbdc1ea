"""Token log-probs as Mosaic TPU Pallas kernels: a forward and two backward kernels.

Forward, grid ``(N / Tn "parallel", V / Tv "arbitrary")``: each step multiplies a ``[Tn, D]`` hidden
block by a ``[D, Tv]`` unembedding tile on the MXU and folds the tile into per-row online-softmax
accumulators held lane-dense in VMEM (``[Tn, 128]``, the value repeated across lanes, as in the
Pallas TPU flash-attention kernel):

    m' = max(m, max_j z_j),  s' = s e^{m - m'} + sum_j e^{z_j - m'},  z_t += sum_j [j = t] z_j,
    a' = a e^{m - m'} + sum_j e^{z_j - m'} z_j                       (entropy)
    q' = q e^{2(m - m')} + sum_j e^{2(z_j - m')}                     (sum of squared probs)

The target logit uses an iota compare, never a one-hot. The last step writes
``[logp, lse, entropy, sum_sq]`` into lanes 0..3 of a lane-dense ``[N, 128]`` output.

Backward recomputes the logits tile by tile, ``p = exp(z - lse)`` and

    dz = g_lp ([j = t] - p) - g_ent p (log p + H) + 2 g_sq p (p - S),

then ``dh = dz @ W^T`` in a kernel with grid ``(token blocks "parallel", vocab tiles "arbitrary")``
and ``dW = h^T @ dz`` in one with grid ``(vocab tiles "parallel", token blocks "arbitrary")``, each
accumulating in a float32 VMEM scratch. All three outputs are exactly differentiable. With a
final-logit soft-cap c each tile is capped right after its matmul, ``z = c tanh(h W / c)``, and
the backward multiplies ``dz`` by ``1 - (z / c)^2``.

Ragged edges: N is padded to a multiple of Tn (cheap, ``[N, D]``); the last vocab tile may run past
V and its out-of-range columns are masked (W is never padded or copied).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from jaxalign.kernels import _softcap

PerToken = Float[Array, "N"]
TokenIds = Int[Array, "N"]

DEFAULT_BLOCK_SIZE = 512  # vocab tile Tv (multiple of 128 on hardware)
TOKEN_BLOCK = 256  # token block Tn
LANES = 128
VMEM_LIMIT_BYTES = 64 * 2**20
_LP, _LSE, _ENT, _SQ = 0, 1, 2, 3  # lanes of the forward output
_ROW_STATS = 8  # backward per-row inputs: lse, g_lp, g_ent, entropy, g_sq, sum_sq


def _blocks(n, vocab, block_size, interpret):
    tn = min(TOKEN_BLOCK, -(-n // 8) * 8)
    tv = min(block_size or DEFAULT_BLOCK_SIZE, vocab)
    if not interpret and tv != vocab:
        tv = -(-tv // LANES) * LANES  # Mosaic tiles: lane dimension a multiple of 128
    return tn, tv, -(-n // tn) * tn


def _params(semantics, interpret):
    kwargs = {"interpret": pltpu.InterpretParams()} if interpret else {}
    return dict(
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=semantics, vmem_limit_bytes=VMEM_LIMIT_BYTES
        ),
        **kwargs,
    )


def _tile_logits(h, w_ref, j, tv, vocab, softcap):
    """``z = h @ W_tile`` (soft-capped) with out-of-range columns (last tile) at -inf, and their
    mask."""
    cols = j * tv + lax.broadcasted_iota(jnp.int32, (1, tv), 1)
    valid = cols < vocab
    w = jnp.where(valid, w_ref[...], jnp.zeros((), w_ref.dtype))  # past-V columns are garbage
    z = _softcap.cap(jnp.dot(h, w, preferred_element_type=jnp.float32), softcap)
    return jnp.where(valid, z, -jnp.inf), cols, valid, w


def _fwd_kernel(
    t_ref,
    h_ref,
    w_ref,
    out_ref,
    m_sc,
    s_sc,
    zt_sc,
    a_sc,
    q_sc,
    *,
    vocab,
    tv,
    want_ent,
    want_sq,
    softcap,
):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        for ref in (s_sc, zt_sc, a_sc, q_sc):
            ref[...] = jnp.zeros(ref.shape, jnp.float32)

    z, cols, valid, _ = _tile_logits(h_ref[...], w_ref, j, tv, vocab, softcap)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, jnp.max(z, axis=1, keepdims=True))  # [Tn, 128]
    alpha = jnp.exp(m_prev - m_new)
    e = jnp.exp(z - m_new[:, :1])
    s_sc[...] = alpha * s_sc[...] + jnp.sum(e, axis=1, keepdims=True)
    zt_sc[...] += jnp.sum(jnp.where(cols == t_ref[...], z, 0.0), axis=1, keepdims=True)
    if want_ent:
        a_sc[...] = alpha * a_sc[...] + jnp.sum(jnp.where(valid, e * z, 0.0), axis=1, keepdims=True)
    if want_sq:
        q_sc[...] = alpha * alpha * q_sc[...] + jnp.sum(e * e, axis=1, keepdims=True)
    m_sc[...] = m_new

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        s = s_sc[...]
        lse = m_sc[...] + jnp.log(s)
        lane = lax.broadcasted_iota(jnp.int32, out_ref.shape, 1)
        out = jnp.where(lane == _LP, zt_sc[...] - lse, 0.0)
        out = jnp.where(lane == _LSE, lse, out)
        if want_ent:
            out = jnp.where(lane == _ENT, lse - a_sc[...] / s, out)
        if want_sq:
            out = jnp.where(lane == _SQ, q_sc[...] / (s * s), out)
        out_ref[...] = out


def _dz(z, cols, valid, t, rows, want_ent, want_sq, softcap):
    """d loss / d z (before the cap) for one tile from the per-row stats ``rows [Tn, 8]``."""
    lse, g_lp = rows[:, 0:1], rows[:, 1:2]
    logp = jnp.where(valid, z - lse, 0.0)
    p = jnp.where(valid, jnp.exp(logp), 0.0)
    dz = g_lp * (jnp.where(cols == t, 1.0, 0.0) - p)
    if want_ent:
        dz = dz - rows[:, 2:3] * p * (logp + rows[:, 3:4])
    if want_sq:
        dz = dz + 2.0 * rows[:, 4:5] * p * (p - rows[:, 5:6])
    return _softcap.chain(dz, z, softcap, valid)


def _dh_kernel(
    t_ref, rows_ref, h_ref, w_ref, dh_ref, acc_sc, *, vocab, tv, want_ent, want_sq, softcap
):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    z, cols, valid, w = _tile_logits(h_ref[...], w_ref, j, tv, vocab, softcap)
    dz = _dz(z, cols, valid, t_ref[...], rows_ref[...], want_ent, want_sq, softcap)
    acc_sc[...] += lax.dot_general(
        dz.astype(w.dtype), w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        dh_ref[...] = acc_sc[...].astype(dh_ref.dtype)


def _dw_kernel(
    t_ref, rows_ref, h_ref, ht_ref, w_ref, dw_ref, acc_sc, *, vocab, tv, want_ent, want_sq, softcap
):
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    z, cols, valid, _ = _tile_logits(h_ref[...], w_ref, j, tv, vocab, softcap)
    dz = _dz(z, cols, valid, t_ref[...], rows_ref[...], want_ent, want_sq, softcap)
    acc_sc[...] += jnp.dot(ht_ref[...], dz.astype(ht_ref.dtype), preferred_element_type=jnp.float32)

    @pl.when(i == pl.num_programs(1) - 1)
    def _finish():
        dw_ref[...] = acc_sc[...].astype(dw_ref.dtype)


def _pad_rows(x, n_pad):
    return jnp.pad(x, [(0, n_pad - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _forward(h, w, t, block_size, want_ent, want_sq, softcap, interpret):
    n, d = h.shape
    vocab = w.shape[1]
    tn, tv, n_pad = _blocks(n, vocab, block_size, interpret)
    grid = (n_pad // tn, pl.cdiv(vocab, tv))
    kernel = functools.partial(
        _fwd_kernel, vocab=vocab, tv=tv, want_ent=want_ent, want_sq=want_sq, softcap=softcap
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n_pad, LANES), jnp.float32),
        grid=grid,
        in_specs=[
            pl.BlockSpec((tn, 1), lambda i, j: (i, 0)),
            pl.BlockSpec((tn, d), lambda i, j: (i, 0)),
            pl.BlockSpec((d, tv), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((tn, LANES), lambda i, j: (i, 0)),
        scratch_shapes=[pltpu.VMEM((tn, LANES), jnp.float32) for _ in range(5)],
        **_params(("parallel", "arbitrary"), interpret),
    )(_pad_rows(t[:, None], n_pad), _pad_rows(h, n_pad), w)[:n]
    entropy = out[:, _ENT] if want_ent else None
    sum_sq = out[:, _SQ] if want_sq else None
    return (out[:, _LP], entropy, sum_sq), out[:, _LSE]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _logprobs(h, w, t, block_size, want_ent, want_sq, softcap, interpret):
    return _forward(h, w, t, block_size, want_ent, want_sq, softcap, interpret)[0]


def _logprobs_fwd(h, w, t, block_size, want_ent, want_sq, softcap, interpret):
    outs, lse = _forward(h, w, t, block_size, want_ent, want_sq, softcap, interpret)
    return outs, (h, w, t, lse, outs[1], outs[2])


def _logprobs_bwd(block_size, want_ent, want_sq, softcap, interpret, res, cotangents):
    h, w, t, lse, entropy, sum_sq = res
    g_lp, g_ent, g_sq = cotangents
    n, d = h.shape
    vocab = w.shape[1]
    tn, tv, n_pad = _blocks(n, vocab, block_size, interpret)
    nt, nv = n_pad // tn, pl.cdiv(vocab, tv)
    zero = jnp.zeros_like(lse)
    rows = jnp.stack(
        [
            lse,
            g_lp,
            g_ent if want_ent else zero,
            entropy if want_ent else zero,
            g_sq if want_sq else zero,
            sum_sq if want_sq else zero,
            zero,
            zero,
        ],
        axis=1,
    )
    t2, rows, hp = _pad_rows(t[:, None], n_pad), _pad_rows(rows, n_pad), _pad_rows(h, n_pad)
    static = dict(vocab=vocab, tv=tv, want_ent=want_ent, want_sq=want_sq, softcap=softcap)
    dh = pl.pallas_call(
        functools.partial(_dh_kernel, **static),
        out_shape=jax.ShapeDtypeStruct((n_pad, d), h.dtype),
        grid=(nt, nv),
        in_specs=[
            pl.BlockSpec((tn, 1), lambda i, j: (i, 0)),
            pl.BlockSpec((tn, _ROW_STATS), lambda i, j: (i, 0)),
            pl.BlockSpec((tn, d), lambda i, j: (i, 0)),
            pl.BlockSpec((d, tv), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((tn, d), lambda i, j: (i, 0)),
        scratch_shapes=[pltpu.VMEM((tn, d), jnp.float32)],
        **_params(("parallel", "arbitrary"), interpret),
    )(t2, rows, hp, w)[:n]
    dw = pl.pallas_call(
        functools.partial(_dw_kernel, **static),
        out_shape=jax.ShapeDtypeStruct((d, vocab), w.dtype),
        grid=(nv, nt),
        in_specs=[
            pl.BlockSpec((tn, 1), lambda j, i: (i, 0)),
            pl.BlockSpec((tn, _ROW_STATS), lambda j, i: (i, 0)),
            pl.BlockSpec((tn, d), lambda j, i: (i, 0)),
            pl.BlockSpec((d, tn), lambda j, i: (0, i)),
            pl.BlockSpec((d, tv), lambda j, i: (0, j)),
        ],
        out_specs=pl.BlockSpec((d, tv), lambda j, i: (0, j)),
        scratch_shapes=[pltpu.VMEM((d, tv), jnp.float32)],
        **_params(("parallel", "arbitrary"), interpret),
    )(t2, rows, hp, hp.T, w)
    return dh, dw, None


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
    interpret: bool = False,
) -> tuple[PerToken, PerToken | None, PerToken | None]:
    """Per-token ``(logp, entropy, sum_sq)`` in float32 on TPU (``interpret=True``: anywhere).

    ``block_size`` is the vocab tile Tv (rounded up to a multiple of 128 on hardware); tokens go in
    blocks of ``TOKEN_BLOCK``. ``targets`` must lie in ``[0, V)``; logits soft-capped by
    ``softcap``.
    """
    return _logprobs(
        hidden, unembedding, targets, block_size, return_entropy, return_sum_sq, softcap, interpret
    )
