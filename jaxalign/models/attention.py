"""Attention kernels behind one call: ``attend(q, k, v, mask, scale=..., implementation=...)``.

``softmax(s q.k^T + mask) v`` with grouped-query heads (query head n reads key/value head
``n // (N / K)``), the logits and softmax in float32, and a boolean ``mask [B, 1, T, S]`` (causal,
same packed segment, sliding window: ``transformer.attention_mask`` builds it). Implementations
(``ModelConfig.attention``):

- ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")``, the reference; it
  materialises the ``[B, N, T, S]`` scores.
- ``"cudnn"``: the same call with ``implementation="cudnn"``, cuDNN's fused (flash) attention
  (Dao et al., "FlashAttention", 2022) on NVIDIA GPUs: the scores stay on chip; the boolean mask
  becomes an additive ``[B, 1, T, S]`` bias, one per row and not per head, so packing, causal
  masking and per-layer sliding windows (data in the scanned layer stack) all take this path.
- ``"splash"``: the Pallas TPU splash attention kernel
  (``jax.experimental.pallas.ops.tpu.splash_attention``, a block-sparse FlashAttention; see
  ``splash_attention``). It does not take the dense mask: the model hands it the segment ids and
  the layer's local/global flag (``SplashMask``) and the kernel masks blocks itself, so neither the
  ``[B, N, T, S]`` scores nor the ``[B, 1, T, S]`` mask exist. It needs T divisible by 128
  (``splash_block``); otherwise the model runs ``"xla"``. Off a TPU platform (``platform``: the
  mesh's devices, so a compile-only plan for a TPU topology gets the real kernel) it runs in
  Pallas interpret mode (tests; slow).
- ``"auto"``: ``"cudnn"`` on a GPU backend, ``"splash"`` on a TPU backend when T divides into
  splash blocks, ``"xla"`` elsewhere.

``attend`` itself always receives a dense mask, so a ``"splash"`` resolution runs ``"xla"`` there.
Decoding with a KV cache (one query per step against S cache slots) always runs the XLA path;
on a CPU platform a decode step takes ``decode_attention`` instead (``block_diagonal_decode``).

Causal query blocks (``attend(..., query_blocks=n)``, XLA path): a full-sequence self-attention
whose mask is causal in slots (a key after the query's slot is always masked) may run as n
query blocks, each against the keys up to its own last query only: the same values, about
(n - 1) / 2n less score and softmax work. The model asks for them on a CPU platform
(``causal_query_blocks``), where XLA materialises every score.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from jaxalign.sharding.rules import ShardingRules, logical_to_spec

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
_AUTO = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}
SPLASH_BLOCKS = (512, 256, 128)  # tried largest first; the kernel's lanes need multiples of 128
CPU_QUERY_BLOCK, CPU_MAX_QUERY_BLOCKS = 32, 8  # causal_query_blocks


def splash_block(seq_len: int) -> int | None:
    """The splash block size (q and kv, forward and backward) for T = ``seq_len``: the largest of
    ``SPLASH_BLOCKS`` dividing T, None when none does (then the model runs ``"xla"``)."""
    return next((b for b in SPLASH_BLOCKS if seq_len % b == 0), None)


def platform(mesh=None) -> str:
    """The platform a program runs on: that of a concrete ``mesh``'s devices (a compile-only plan
    for a TPU topology targets TPU devices from a CPU machine), else the default backend."""
    if isinstance(mesh, Mesh):
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def resolve(implementation: str, seq_len: int | None = None, mesh=None) -> str:
    """The implementation that runs for ``implementation`` on ``platform(mesh)`` at sequence
    length ``seq_len`` (None: not checked). ``"auto"``: cudnn on GPU, splash on TPU, else xla;
    ``"splash"`` (or ``"auto"`` on TPU) becomes ``"xla"`` when ``splash_block(seq_len)`` is None;
    ``"cudnn"`` off a GPU backend raises ValueError."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {implementation!r}; expected one of "
            f"{ATTENTION_IMPLEMENTATIONS}"
        )
    backend = platform(mesh)
    if implementation == "auto":
        implementation = _AUTO.get(backend, "xla")
    if implementation == "cudnn" and _AUTO.get(backend) != "cudnn":
        raise ValueError(
            f'attention="cudnn" needs a GPU backend but the default backend is {backend!r}; '
            'use "auto" or "xla"'
        )
    if implementation == "splash" and seq_len is not None and splash_block(seq_len) is None:
        return "xla"
    return implementation


def causal_query_blocks(seq_len: int, mesh=None) -> int:
    """The query blocks of a causal self-attention over T = ``seq_len`` (``attend``'s
    ``query_blocks``): on a CPU platform (``platform(mesh)``) ceil(T / 32), at most 8 (one
    attention's forward + backward alone at T = 254, 16 rows, 8/4 heads of 32: 94 -> 55 ms; T =
    191, 64 rows: 218 -> 144 ms; in the whole model the forward gains 15-25%, the backward
    little), else 1."""
    if platform(mesh) != "cpu":
        return 1
    return min(-(-seq_len // CPU_QUERY_BLOCK), CPU_MAX_QUERY_BLOCKS)


def attend(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    mask: Bool[Array, "B 1 T S"],
    *,
    scale: float | None,
    implementation: str = "auto",
    query_blocks: int = 1,
) -> Float[Array, "B T N H"]:
    """``softmax(scale q.k^T where mask) v`` per head (``scale`` None: ``H ** -0.5``), by
    ``implementation`` (see the module docstring; ``"splash"`` runs ``"xla"`` here, on a dense
    mask). Every row of ``mask`` must keep one key. ``query_blocks`` n > 1 (XLA path; S = T and
    ``mask`` causal in slots, as a full-sequence forward's): n query blocks of near-equal size,
    block [a, b) against keys [0, b) only."""
    impl = resolve(implementation)
    impl = "xla" if impl == "splash" else impl
    T = q.shape[1]
    n = min(query_blocks, T)
    if impl != "xla" or n <= 1:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)
    edges = [T * i // n for i in range(n + 1)]
    return jnp.concatenate(
        [
            jax.nn.dot_product_attention(
                q[:, a:b],
                k[:, :b],
                v[:, :b],
                mask=mask[:, :, a:b, :b],
                scale=scale,
                implementation="xla",
            )
            for a, b in zip(edges[:-1], edges[1:], strict=True)
        ],
        axis=1,
    )


def block_diagonal_decode(seq_len: int, mesh=None) -> bool:
    """Whether a cached forward of T = ``seq_len`` new tokens per row attends by
    ``decode_attention``: one token (a decode step) on a CPU platform (``platform(mesh)``)."""
    return seq_len == 1 and platform(mesh) == "cpu"


def decode_attention(
    q: Float[Array, "B 1 N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    mask: Bool[Array, "B 1 1 S"],
    *,
    scale: float,
    softcap: float | None = None,
) -> Float[Array, "B 1 N H"]:
    """One query per row against S cache slots, ``softmax(mask(c tanh(s q.k / c))) v`` (no cap:
    ``softmax(mask(s q.k)) v``), logits and softmax in float32, as ``attend`` computes it.

    The cache rows are read as they lie, ``[S, K * H]`` per row: the queries become a
    block-diagonal ``[K * H, K * G]`` matrix (query head n = k G + g in column n, its values in
    rows k H .. k H + H - 1, zeros elsewhere), so the logits of every head are one matmul
    ``[S, K H] x [K H, K G]`` and the outputs one ``[K G, S] x [S, K H]`` whose diagonal blocks
    are kept. K times the FLOPs of the per-head products, which are tiny at one query; what it
    saves is XLA's CPU backend copying the whole cache into a head-major layout for its batched
    matmuls on every layer of every step (Llama d=256, 8/4 heads, 64 rows x 192 slots: a
    128-token decode 3.1 -> 2.65 s)."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    eye = jnp.eye(K, dtype=q.dtype)
    queries = jnp.einsum("bkgh,jk->bjhkg", q.reshape(B, K, G, H), eye).reshape(B, K * H, N)
    logits = jnp.einsum(
        "bsc,bcn->bsn", k.reshape(B, S, K * H), queries, preferred_element_type=jnp.float32
    )
    logits = logits * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(mask[:, 0, 0, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=1).astype(v.dtype)
    out = jnp.einsum("bsn,bsc->bnc", probs, v.reshape(B, S, K * H)).reshape(B, K, G, K, H)
    return jnp.einsum("bkgjh,kj->bkgh", out, eye).reshape(B, T, N, H)


class SplashMask(NamedTuple):
    """What the model hands ``Attention`` instead of the dense mask when splash runs: the segment
    ids (the causal and sliding-window parts are static kernel masks), this layer's local flag
    (traced data of the scanned layer stack) and where to shard the kernel (``splash_attention``).
    """

    segment_ids: Int[Array, "B T"]
    local: Bool[Array, ""]
    mesh: Any = None
    rules: ShardingRules | None = None


def splash_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K H"],
    segment_ids: Int[Array, "B T"],
    *,
    local: Bool[Array, ""] | bool,
    window: int | None,
    scale: float,
    softcap: float | None = None,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
) -> Float[Array, "B T N H"]:
    """Self-attention ``softmax(mask(c tanh(s q.k / c))) v`` by the Pallas TPU splash kernel
    (block-sparse FlashAttention: Dao et al., "FlashAttention", 2022; the JAX splash kernel),
    the same function as ``attend`` on ``transformer.attention_mask`` and ``softcapped_attention``.

    Mask: key slot j is visible from query slot i when ``j <= i`` (``CausalMask``), both carry the
    same segment id (``SegmentIds``; packing, padding 0 sees padding) and, when ``local`` and
    ``window`` W is set, ``i - j < W`` (``LocalMask((W - 1, 0))``). The window counts slots where
    the dense mask counts positions: the same within a packed sequence, whose positions run
    0, 1, ... over consecutive slots (every training batch); padding rows (segment 0, all at
    position 0) differ, and no loss reads them. ``local`` is traced data in the scanned layer
    stack, so a model with a window picks the local or the global kernel with ``lax.cond``.

    The kernel does not scale: q is multiplied by ``scale`` first (in q's dtype); ``softcap`` c is
    the kernel's ``attn_logits_soft_cap`` (Gemma 2), None for plain softmax. Query head n reads
    key/value head ``n // (N / K)``. The kernel runs per example (``vmap`` over B) on ``[N, T, H]``
    with blocks of ``splash_block(T)`` (T must divide); off a TPU platform in interpret mode.

    Under a mesh (``mesh``, else the one set with ``jax.set_mesh``) a Pallas call cannot be
    partitioned by GSPMD, so the kernel runs in ``jax.shard_map``: rows over the mesh axes of the
    logical "batch" axis and heads over those of "heads"/"kv_heads" (``rules``, default the "dp"
    preset); when the K kv heads do not split like the N query heads (K < tensor), k and v are
    repeated to N heads first.
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    block = splash_block(T)
    if block is None:
        raise ValueError(f"splash attention needs T divisible by 128; T={T}")
    q = (q * scale).astype(q.dtype)
    interpret = platform(mesh) != "tpu"
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        mesh = None if mesh.empty else mesh

    if mesh is not None:
        rules = ShardingRules() if rules is None else rules
        q_spec = logical_to_spec(("batch", None, "heads", None), rules, shape=q.shape, mesh=mesh)
        kv_spec = logical_to_spec(
            ("batch", None, "kv_heads", None), rules, shape=k.shape, mesh=mesh
        )
        if kv_spec[2] != q_spec[2]:
            k, v = (jnp.repeat(x, N // K, axis=2) for x in (k, v))
            kv_spec = q_spec

    def attention(mask_window: int | None):
        def run(q, k, v, segment_ids):
            kernel = _splash_kernel(q.shape[2], T, block, mask_window, softcap, interpret)

            def one(q, k, v, seg):
                heads_first = (x.swapaxes(0, 1) for x in (q, k, v))
                return kernel(*heads_first, splash.SegmentIds(q=seg, kv=seg)).swapaxes(0, 1)

            return jax.vmap(one)(q, k, v, segment_ids)

        if mesh is None:
            return run
        return jax.shard_map(
            run,
            mesh=mesh,
            in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(q_spec[0], None)),
            out_specs=q_spec,
            check_vma=False,
        )

    args = (q, k, v, segment_ids)
    if window is None:
        return attention(None)(*args)
    return jax.lax.cond(local, attention(window), attention(None), *args)


def _splash_kernel(
    n_heads: int, seq_len: int, block: int, window: int | None, softcap, interpret: bool
):
    """``make_splash_mha`` for ``n_heads`` heads of T x T causal (and ``window``) masks; in the
    Pallas interpreter off TPU (tests)."""
    shape = (seq_len, seq_len)
    if window is None:
        head_mask = splash.CausalMask(shape)
    else:
        head_mask = splash.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    blocks = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        use_fused_bwd_kernel=True,
    )
    return splash.make_splash_mha(
        splash.MultiHeadMask([head_mask] * n_heads),
        block_sizes=blocks,
        attn_logits_soft_cap=softcap,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
