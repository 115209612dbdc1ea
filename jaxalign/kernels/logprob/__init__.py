"""Token log-probabilities (and entropy, sum of squared probabilities) from hidden states.

Models return hidden states; this op turns ``hidden [..., D]`` and the unembedding ``W [D, V]`` into
per-token ``log softmax(h @ W)[target]`` without materialising ``[N, V]`` logits (except in
``reference``). Models with a final-logit soft-cap c (Gemma 2) pass ``softcap=c``: every
implementation then uses ``z = c tanh(h @ W / c)``, tile by tile, gradients included.

Implementations (``implementation=``):

- ``"reference"``: full logits + ``log_softmax`` + gather; the spec.
- ``"xla"``: vocab-blocked online logsumexp under ``jax.custom_vjp``; portable, the CPU default.
- ``"pallas_tpu"``: Mosaic TPU kernels (forward, dH, dW).
- ``"pallas_gpu"``: Pallas Triton kernels (forward, dH, dW).

``None`` picks by ``jax.default_backend()``: tpu -> pallas_tpu, xla, reference;
gpu -> xla, pallas_gpu, reference (xla measured 5x faster on an H200); cpu -> xla, reference
(first that imports). On CPU, ``None`` also keeps the forward's logits tiles for the backward
(``xla`` with ``keep_logits=True``: three matmul passes instead of four) when the float32
``[N, V]`` logits take at most ``CPU_KEEP_LOGITS_BYTES`` (1 GiB); above it, and on every other
backend, the backward recomputes them and memory stays O(N * block). Measured on the 2-core CPU
(N=4064, D=256, V=32000, f32 fwd+bwd): blocked 1.93 s, kept 1.66 s, full logits (reference)
1.87 s; a full-size ``[N, V]`` matmul runs at about half the speed of the same work in
``[N, 1024]`` tiles there, which is why the plain path is not the faster one.

Multi-device: XLA's SPMD partitioner cannot split a Pallas custom call, so under ``jax.jit`` with
inputs sharded over several devices call ``sharded_token_logprobs`` (``jax.shard_map``; batch axes
as ``token_axes``, vocab axis for a vocab-sharded W) and each device runs the kernel on its shard.
The ``xla`` implementation partitions like any XLA code.
"""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Float, Int

from jaxalign.kernels import _dispatch, _softcap

_PACKAGE = __name__

# implementation=None on CPU keeps the [N, V] float32 logits for the backward up to this size.
CPU_KEEP_LOGITS_BYTES = 1 << 30


def _keeps_logits(implementation, module, n: int, vocab: int) -> bool:
    """Whether ``implementation=None`` keeps the logits: CPU, ``xla``, ``4 N V`` within budget."""
    return (
        implementation is None
        and jax.default_backend() == "cpu"
        and module.__name__.endswith(".xla")
        and 4 * n * vocab <= CPU_KEEP_LOGITS_BYTES
    )


def _call(module, h, w, t, return_entropy, return_sum_sq, block_size, softcap, interpret, keep):
    name = module.__name__.rsplit(".", 1)[1]
    kwargs = {"interpret": interpret} if name.startswith("pallas") else {}
    if keep:
        kwargs["keep_logits"] = True
    return module.logprobs(
        h,
        w,
        t,
        return_entropy=return_entropy,
        return_sum_sq=return_sum_sq,
        block_size=block_size,
        softcap=softcap,
        **kwargs,
    )


def _finish(lead_shape, valid, mask, logp, entropy, sum_sq):
    """NaN where the (unmasked) target was out of range, 0 where masked; reshape; pack extras."""
    logp = jnp.where(valid, logp, jnp.nan)
    outs = {"logp": logp, "entropy": entropy, "sum_sq_probs": sum_sq}
    if mask is not None:
        outs = {k: None if v is None else jnp.where(mask, v, 0.0) for k, v in outs.items()}
    outs = {k: None if v is None else v.reshape(lead_shape) for k, v in outs.items()}
    extras = {k: v for k, v in outs.items() if k != "logp" and v is not None}
    return (outs["logp"], extras) if extras else outs["logp"]


def _prepare(hidden, unembedding, targets, mask):
    if unembedding.ndim != 2 or unembedding.shape[0] != hidden.shape[-1]:
        raise ValueError(
            f"jaxalign: unembedding has shape {unembedding.shape}, expected (D, V) with "
            f"D = {hidden.shape[-1]} (hidden.shape[-1])"
        )
    vocab = unembedding.shape[1]
    _dispatch.check_targets(targets, vocab, mask)
    h, t, m = _dispatch.flatten_tokens(hidden, targets, mask)
    valid = (t >= 0) & (t < vocab)
    keep = valid if m is None else valid & m
    t = jnp.where(keep, t, 0)
    if m is not None:
        # Masked rows contribute nothing, even if their hidden states are not finite.
        h = jnp.where(m[:, None], h, jnp.zeros((), h.dtype))
    return h, t, m, valid


def token_logprobs(
    hidden: Float[Array, "*B D"],
    unembedding: Float[Array, "D V"],
    targets: Int[Array, "*B"],
    *,
    implementation: str | None = None,
    mask: Array | None = None,
    return_entropy: bool = False,
    return_sum_sq: bool = False,
    block_size: int | None = None,
    softcap: float | None = None,
    interpret: bool = False,
):
    """``log p(target | h) = z[target] - logsumexp(z)`` per token, float32, with logits
    ``z = h @ W``, or ``z = c tanh(h @ W / c)`` with ``softcap`` c.

    Args:
      hidden: ``[B, T, D]`` or ``[N, D]`` (any leading shape), bfloat16 or float32.
      unembedding: ``[D, V]``; bfloat16 or float32. Accumulation is float32 throughout.
      targets: integer ids with ``hidden``'s leading shape.
      implementation: ``None`` (best for the backend; on CPU ``xla`` keeping the logits for the
        backward while ``4 N V <= CPU_KEEP_LOGITS_BYTES``) or one of ``reference``, ``xla``,
        ``pallas_tpu``, ``pallas_gpu`` (``xla`` named explicitly always recomputes).
      mask: optional, leading shape; 0/False positions return 0 and get zero gradient, and their
        targets may be anything (e.g. -100 padding).
      return_entropy: also return ``entropy = -sum_j p_j log p_j``.
      return_sum_sq: also return ``sum_sq_probs = sum_j p_j^2``.
      block_size: vocab tile width (implementation default when None); V need not be a multiple.
      softcap: final-logit soft-cap c (``ModelConfig.final_logit_softcap``) or None; applied to
        each vocab tile, so capped models keep the no-``[N, V]`` path.
      interpret: run Pallas implementations in the Pallas interpreter (tests on CPU).

    Returns:
      ``logp`` with ``targets.shape``, or ``(logp, extras)`` with ``extras`` holding ``"entropy"``
      and/or ``"sum_sq_probs"`` when asked. All outputs are differentiable w.r.t. ``hidden`` and
      ``unembedding`` in every implementation.

    Raises:
      ValueError: for a concrete unmasked target outside ``[0, V)``. Under ``jax.jit`` targets are
      not concrete; such positions then return NaN (the gather index is clamped to 0 internally, and
      the NaN is the signal).
    """
    module = _dispatch.resolve(_PACKAGE, implementation, interpret)
    lead = targets.shape
    h, t, m, valid = _prepare(hidden, unembedding, targets, mask)
    keep = _keeps_logits(implementation, module, h.shape[0], unembedding.shape[1])
    logp, entropy, sum_sq = _call(
        module,
        h,
        unembedding,
        t,
        return_entropy,
        return_sum_sq,
        block_size,
        softcap,
        interpret,
        keep,
    )
    return _finish(lead, valid, m, logp, entropy, sum_sq)


def _combine_shards(lse_l, zt, ent_l, sq_l, axis):
    """Merge per-shard statistics over ``axis``.

    With shard weights ``w_l = exp(lse_l - lse)``: ``lse = log sum_l exp(lse_l)``,
    ``E[z] = sum_l w_l (lse_l - H_l)``, so ``H = lse - E[z]``; ``sum_sq = sum_l w_l^2 S_l``.
    """
    big = jax.lax.pmax(jax.lax.stop_gradient(lse_l), axis)  # stabiliser only; result is exact
    lse = big + jnp.log(jax.lax.psum(jnp.exp(lse_l - big), axis))
    w = jnp.exp(lse_l - lse)
    logp = jax.lax.psum(zt, axis) - lse
    entropy = None if ent_l is None else lse - jax.lax.psum(w * (lse_l - ent_l), axis)
    sum_sq = None if sq_l is None else jax.lax.psum(w * w * sq_l, axis)
    return logp, entropy, sum_sq


def sharded_token_logprobs(
    hidden: Float[Array, "*B D"],
    unembedding: Float[Array, "D V"],
    targets: Int[Array, "*B"],
    *,
    mesh: Mesh,
    vocab_axis: str = "tensor",
    token_axes: str | tuple[str, ...] | None = None,
    implementation: str | None = None,
    mask: Array | None = None,
    return_entropy: bool = False,
    return_sum_sq: bool = False,
    block_size: int | None = None,
    softcap: float | None = None,
    interpret: bool = False,
):
    """``token_logprobs`` with the unembedding's V sharded over ``mesh`` axis ``vocab_axis``.

    Inside ``jax.shard_map`` each shard runs the chosen implementation on its ``W[:, V_l]`` and
    gives its logsumexp ``lse_l``, the target logit if the target falls in its range (else 0), and
    local entropy / sum of squares; ``psum``/``pmax`` over ``vocab_axis`` merge them (see
    ``_combine_shards``). Values and gradients equal the unsharded op. Tokens are replicated over
    ``vocab_axis`` and may be split over ``token_axes`` (N must divide evenly). V must divide evenly
    by the axis size. Same arguments, returns and errors as ``token_logprobs``.
    """
    module = _dispatch.resolve(_PACKAGE, implementation, interpret)
    lead = targets.shape
    vocab = unembedding.shape[1]
    shards = mesh.shape[vocab_axis]
    if vocab % shards:
        raise ValueError(
            f"jaxalign: V = {vocab} is not divisible by mesh axis {vocab_axis!r} of size {shards}"
        )
    h, t, m, valid = _prepare(hidden, unembedding, targets, mask)
    token_names = (token_axes,) if isinstance(token_axes, str) else tuple(token_axes or ())

    def local(h, w, t):
        v_local = w.shape[1]
        offset = jax.lax.axis_index(vocab_axis) * v_local
        t_local = t - offset
        mine = (t_local >= 0) & (t_local < v_local)
        t_local = jnp.where(mine, t_local, 0)
        # Mark every input varying over all mapped axes so the kernel's custom_vjp sees one type;
        # the transposes of these casts psum dh over the vocab axis and dW over the token axes.
        h = jax.lax.pcast(h, (vocab_axis,), to="varying")
        if token_names:
            w = jax.lax.pcast(w, token_names, to="varying")
        lp_l, ent_l, sq_l = _call(
            module,
            h,
            w,
            t_local,
            return_entropy,
            return_sum_sq,
            block_size,
            softcap,
            interpret,
            keep=False,
        )
        # lse_l = z_t - logp_l; the one-hot parts of the two gradients cancel (exactly without a
        # cap, to rounding with one).
        z_t = jnp.einsum(
            "nd,dn->n", h, jnp.take(w, t_local, axis=1), preferred_element_type=jnp.float32
        )
        z_t = _softcap.cap(z_t, softcap)
        lse_l = z_t - lp_l
        return _combine_shards(lse_l, jnp.where(mine, z_t, 0.0), ent_l, sq_l, vocab_axis)

    tok = PartitionSpec(token_axes)
    in_specs = (PartitionSpec(token_axes, None), PartitionSpec(None, vocab_axis), tok)
    args = _dispatch.place(mesh, (h, unembedding, t), in_specs)
    out = (tok, tok if return_entropy else None, tok if return_sum_sq else None)
    logp, entropy, sum_sq = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out)(*args)
    return _finish(lead, valid, m, logp, entropy, sum_sq)
