"""Token log-probs as Pallas Triton (GPU) kernels: a forward and two backward kernels.

Forward, grid ``(N / Tn, V / Tv)``: each program computes one ``[Tn, Tv]`` logits tile
``z = h @ W`` (a loop over D in chunks of Td, on tensor cores) and reduces it in registers to
per-row partial statistics over its tile,

    m = max_j z_j,  s = sum_j e^{z_j - m},  z_t = sum_j [j = t] z_j,
    a = sum_j e^{z_j - m} z_j (entropy),  q = sum_j e^{2(z_j - m)} (sum of squared probs),

written to small ``[V / Tv, N]`` arrays. The tiles are merged in XLA with the usual
rescaling (``lse = M + log sum_k s_k e^{m_k - M}`` etc.). Only ``[N, V / Tv]`` partials, never
``[N, V]`` logits, reach memory. The target logit uses an iota compare, never a one-hot.

Backward recomputes the logits tiles, ``p = exp(z - lse)`` and

    dz = g_lp ([j = t] - p) - g_ent p (log p + H) + 2 g_sq p (p - S),

in two kernels: grid ``(N / Tn,)`` loops over vocab tiles and accumulates ``dh[rows] += dz @ W^T``;
grid ``(V / Tv,)`` loops over token blocks and accumulates ``dW[:, cols] += h^T @ dz`` (each
program owns its output rows/columns: no atomics, deterministic). Both accumulate in float32
outputs. Matmul work: forward 2NDV, backward 8NDV (each backward kernel recomputes the logits).
All three outputs are exactly differentiable. With a final-logit soft-cap c each tile is capped
after its matmul, ``z = c tanh(h W / c)``, and the backward multiplies ``dz`` by ``1 - (z / c)^2``.

Ragged edges (N, V, D not multiples of the blocks) use masked loads and stores.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from jaxalign.kernels import _softcap

PerToken = Float[Array, "N"]
TokenIds = Int[Array, "N"]

DEFAULT_BLOCK_SIZE = 128  # vocab tile Tv
TOKEN_BLOCK = 64  # Tn
D_BLOCK = 64  # Td, the matmul reduction chunk
NUM_WARPS = 4
NUM_STAGES = 3


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, pl.next_power_of_2(x))


def _blocks(n, d, vocab, block_size):
    """Triton needs power-of-two tiles of at least 16."""
    return (
        min(TOKEN_BLOCK, _pow2(n)),
        min(_pow2(block_size or DEFAULT_BLOCK_SIZE), _pow2(vocab)),
        min(D_BLOCK, _pow2(d)),
    )


def _call(kernel, out_shape, grid, interpret):
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
    )


def _index(start, size, limit):
    idx = start + jnp.arange(size)
    return pl.ds(start, size), idx, idx < limit


def _load2(ref, rs, rmask, cs, cmask):
    return plgpu.load(ref.at[rs, cs], mask=rmask[:, None] & cmask[None, :], other=0.0)


def _logits(h_ref, w_ref, rs, rmask, cs, cmask, tn, tv, td):
    """``z = h[rows] @ W[:, cols]`` in float32, looping over D in chunks of Td."""
    d = h_ref.shape[1]

    def body(k, acc):
        ds, _, dmask = _index(k * td, td, d)
        hb = _load2(h_ref, rs, rmask, ds, dmask)
        wb = _load2(w_ref, ds, dmask, cs, cmask)
        return acc + jnp.dot(hb, wb, preferred_element_type=jnp.float32)

    return lax.fori_loop(0, pl.cdiv(d, td), body, jnp.zeros((tn, tv), jnp.float32))


def _fwd_kernel(h_ref, w_ref, t_ref, *part_refs, tn, tv, td, want_ent, want_sq, softcap):
    n, vocab = h_ref.shape[0], w_ref.shape[1]
    i, j = pl.program_id(0), pl.program_id(1)
    rs, _, rmask = _index(i * tn, tn, n)
    cs, cols, cmask = _index(j * tv, tv, vocab)
    z = _softcap.cap(_logits(h_ref, w_ref, rs, rmask, cs, cmask, tn, tv, td), softcap)
    z = jnp.where(cmask[None, :], z, -jnp.inf)
    t = plgpu.load(t_ref.at[rs], mask=rmask, other=0)
    m = jnp.max(z, axis=1)
    e = jnp.exp(z - m[:, None])
    stats = [m, jnp.sum(e, axis=1), jnp.sum(jnp.where(cols[None, :] == t[:, None], z, 0.0), 1)]
    if want_ent:
        stats.append(jnp.sum(jnp.where(cmask[None, :], e * z, 0.0), axis=1))
    if want_sq:
        stats.append(jnp.sum(e * e, axis=1))
    for ref, x in zip(part_refs, stats, strict=True):
        plgpu.store(ref.at[j, rs], x, mask=rmask)


def _dz(z, cols, cmask, t, rows, want_ent, want_sq, softcap):
    """d loss / d z of one tile of uncapped logits ``z``; ``rows``: lse, g_lp, g_ent, entropy,
    g_sq, sum_sq ([Tn] each)."""
    z = _softcap.cap(z, softcap)
    lse, g_lp, g_ent, ent, g_sq, sq = (r[:, None] for r in rows)
    logp = jnp.where(cmask[None, :], z - lse, 0.0)
    p = jnp.where(cmask[None, :], jnp.exp(logp), 0.0)
    dz = g_lp * (jnp.where(cols[None, :] == t[:, None], 1.0, 0.0) - p)
    if want_ent:
        dz = dz - g_ent * p * (logp + ent)
    if want_sq:
        dz = dz + 2.0 * g_sq * p * (p - sq)
    return _softcap.chain(dz, z, softcap, cmask[None, :])


def _load_rows(t_ref, rows_refs, rs, rmask):
    t = plgpu.load(t_ref.at[rs], mask=rmask, other=0)
    return t, [plgpu.load(r.at[rs], mask=rmask, other=0.0) for r in rows_refs]


def _dh_kernel(h_ref, w_ref, t_ref, *refs, tn, tv, td, want_ent, want_sq, softcap):
    (n, d), vocab = h_ref.shape, w_ref.shape[1]
    *rows_refs, dh_ref = refs
    rs, _, rmask = _index(pl.program_id(0) * tn, tn, n)
    t, rows = _load_rows(t_ref, rows_refs, rs, rmask)

    def zero(k, _):
        ds, _, dmask = _index(k * td, td, d)
        plgpu.store(
            dh_ref.at[rs, ds],
            jnp.zeros((tn, td), jnp.float32),
            mask=rmask[:, None] & dmask[None, :],
        )

    lax.fori_loop(0, pl.cdiv(d, td), zero, None)

    def vocab_tile(j, _):
        cs, cols, cmask = _index(j * tv, tv, vocab)
        z = _logits(h_ref, w_ref, rs, rmask, cs, cmask, tn, tv, td)
        dz = _dz(z, cols, cmask, t, rows, want_ent, want_sq, softcap).astype(w_ref.dtype)

        def d_chunk(k, _):
            ds, _, dmask = _index(k * td, td, d)
            wb = _load2(w_ref, ds, dmask, cs, cmask)  # [Td, Tv]
            upd = lax.dot_general(
                dz, wb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )
            mask = rmask[:, None] & dmask[None, :]
            cur = plgpu.load(dh_ref.at[rs, ds], mask=mask, other=0.0)
            plgpu.store(dh_ref.at[rs, ds], cur + upd, mask=mask)

        lax.fori_loop(0, pl.cdiv(d, td), d_chunk, None)

    lax.fori_loop(0, pl.cdiv(vocab, tv), vocab_tile, None)


def _dw_kernel(h_ref, w_ref, t_ref, *refs, tn, tv, td, want_ent, want_sq, softcap):
    (n, d), vocab = h_ref.shape, w_ref.shape[1]
    *rows_refs, dw_ref = refs
    cs, cols, cmask = _index(pl.program_id(0) * tv, tv, vocab)

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
        t, rows = _load_rows(t_ref, rows_refs, rs, rmask)
        z = _logits(h_ref, w_ref, rs, rmask, cs, cmask, tn, tv, td)
        dz = _dz(z, cols, cmask, t, rows, want_ent, want_sq, softcap).astype(h_ref.dtype)

        def d_chunk(k, _):
            ds, _, dmask = _index(k * td, td, d)
            hb = _load2(h_ref, rs, rmask, ds, dmask)  # [Tn, Td]
            upd = lax.dot_general(
                hb, dz, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )
            mask = dmask[:, None] & cmask[None, :]
            cur = plgpu.load(dw_ref.at[ds, cs], mask=mask, other=0.0)
            plgpu.store(dw_ref.at[ds, cs], cur + upd, mask=mask)

        lax.fori_loop(0, pl.cdiv(d, td), d_chunk, None)

    lax.fori_loop(0, pl.cdiv(n, tn), token_block, None)


def _forward(h, w, t, block_size, want_ent, want_sq, softcap, interpret):
    (n, d), vocab = h.shape, w.shape[1]
    tn, tv, td = _blocks(n, d, vocab, block_size)
    nv = pl.cdiv(vocab, tv)
    kernel = functools.partial(
        _fwd_kernel, tn=tn, tv=tv, td=td, want_ent=want_ent, want_sq=want_sq, softcap=softcap
    )
    n_stats = 3 + want_ent + want_sq
    part = _call(
        kernel,
        [jax.ShapeDtypeStruct((nv, n), jnp.float32)] * n_stats,
        (pl.cdiv(n, tn), nv),
        interpret,
    )(h, w, t)
    m_k, s_k, zt_k = part[0], part[1], part[2]
    big = jnp.max(m_k, axis=0)
    scale = jnp.exp(m_k - big)  # [V / Tv, N]
    s = jnp.sum(s_k * scale, axis=0)
    lse = big + jnp.log(s)
    logp = jnp.sum(zt_k, axis=0) - lse
    entropy = lse - jnp.sum(part[3] * scale, axis=0) / s if want_ent else None
    sum_sq = jnp.sum(part[-1] * scale * scale, axis=0) / (s * s) if want_sq else None
    return (logp, entropy, sum_sq), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _logprobs(h, w, t, block_size, want_ent, want_sq, softcap, interpret):
    return _forward(h, w, t, block_size, want_ent, want_sq, softcap, interpret)[0]


def _logprobs_fwd(h, w, t, block_size, want_ent, want_sq, softcap, interpret):
    outs, lse = _forward(h, w, t, block_size, want_ent, want_sq, softcap, interpret)
    return outs, (h, w, t, lse, outs[1], outs[2])


def _logprobs_bwd(block_size, want_ent, want_sq, softcap, interpret, res, cotangents):
    h, w, t, lse, entropy, sum_sq = res
    g_lp, g_ent, g_sq = cotangents
    (n, d), vocab = h.shape, w.shape[1]
    tn, tv, td = _blocks(n, d, vocab, block_size)
    zero = jnp.zeros_like(lse)
    rows = (
        lse,
        g_lp,
        g_ent if want_ent else zero,
        entropy if want_ent else zero,
        g_sq if want_sq else zero,
        sum_sq if want_sq else zero,
    )
    static = dict(tn=tn, tv=tv, td=td, want_ent=want_ent, want_sq=want_sq, softcap=softcap)
    dh = _call(
        functools.partial(_dh_kernel, **static),
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        (pl.cdiv(n, tn),),
        interpret,
    )(h, w, t, *rows)
    dw = _call(
        functools.partial(_dw_kernel, **static),
        jax.ShapeDtypeStruct((d, vocab), jnp.float32),
        (pl.cdiv(vocab, tv),),
        interpret,
    )(h, w, t, *rows)
    return dh.astype(h.dtype), dw.astype(w.dtype), None


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
    """Per-token ``(logp, entropy, sum_sq)`` in float32 on GPU (``interpret=True``: anywhere).

    ``block_size`` is the vocab tile Tv (rounded up to a power of two); ``targets`` in ``[0, V)``;
    logits soft-capped by ``softcap``.
    """
    return _logprobs(
        hidden, unembedding, targets, block_size, return_entropy, return_sum_sq, softcap, interpret
    )
