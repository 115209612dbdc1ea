"""Llama-family decoder as Flax NNX modules, with layers stacked on a leading axis and scanned.

One block (Touvron et al., "LLaMA", 2023):

    h = x + Attn(RMSNorm(x)),   y = h + MLP(RMSNorm(h)),   MLP(x) = W_down(silu(W_gate x) * W_up x)

Attention is grouped-query (Ainslie et al., "GQA", 2023): N query heads share K key/value heads.
Options cover Mistral (sliding window), Qwen2 (q/k/v bias) and Qwen3 (RMSNorm over head_dim on q
and k before RoPE). The L blocks are created with ``nnx.vmap`` so every layer parameter has a
leading ``layers`` axis, and run with ``jax.lax.scan`` (compile time independent of L), the body
optionally rematerialised with ``jax.checkpoint``.

Masking: a query attends to a key when the key is not later (causal), both carry the same
segment id (packed sequences; 0 marks padding, which then only sees other padding, so no row of
the mask is empty), and, with ``sliding_window`` W, ``pos_q - pos_k < W`` (Hugging Face Mistral).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from jaxalign.models.config import ModelConfig
from jaxalign.models.rope import apply_rope, rope_inv_freq

INIT_STD = 0.02


def _param(
    rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype, init: str
) -> nnx.Param:
    """A parameter with its logical axis names as ``out_sharding`` metadata (never eagerly sharded;
    placement comes from ``jax.jit(init_params, out_shardings=...)``)."""
    if init == "normal":
        value = INIT_STD * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = jnp.zeros(shape, dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """``y = x / sqrt(mean(x^2) + eps) * scale`` over the last axis, in float32 (Zhang & Sennrich,
    "Root Mean Square Layer Normalization", 2019). ``scale`` is the HF Llama weight (init ones).
    Computed in at least float32."""

    def __init__(self, dim: int, axis_name: str, eps: float, param_dtype):
        self.eps = eps
        self.scale = _param(None, (dim,), (axis_name,), param_dtype, "ones")

    def __call__(self, x: Float[Array, "... X"]) -> Float[Array, "... X"]:
        compute = jnp.promote_types(x.dtype, jnp.float32)  # float32, or float64 under x64
        xf = x.astype(compute)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(compute)).astype(x.dtype)


class Dense(nnx.Module):
    """``y = x . kernel (+ bias)``, contracting the trailing ``len(in_shape)`` axes of x with the
    leading axes of ``kernel [*in_shape, *out_shape]``."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        in_axes: tuple[str, ...],
        out_axes: tuple[str, ...],
        *,
        use_bias: bool,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        self.n_in = len(in_shape)
        self.dtype = dtype
        self.kernel = _param(rngs, in_shape + out_shape, in_axes + out_axes, param_dtype, "normal")
        self.bias = _param(None, out_shape, out_axes, param_dtype, "zeros") if use_bias else None

    def __call__(self, x: Array) -> Array:
        y = jnp.tensordot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.n_in)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table ``embedding [V, D]``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(config.dtype)
        self.embedding = _param(
            rngs,
            (config.vocab_size, config.d_model),
            ("vocab", "embed"),
            jnp.dtype(config.param_dtype),
            "normal",
        )

    def __call__(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional q/k/v bias and q/k RMSNorm."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        kw = dict(use_bias=c.qkv_bias, dtype=dt, param_dtype=pdt, rngs=rngs)
        D, N, K, H = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = Dense((D,), (N, H), ("embed",), ("heads", "head_dim"), **kw)
        self.k_proj = Dense((D,), (K, H), ("embed",), ("kv_heads", "head_dim"), **kw)
        self.v_proj = Dense((D,), (K, H), ("embed",), ("kv_heads", "head_dim"), **kw)
        self.o_proj = Dense(
            (N, H),
            (D,),
            ("heads", "head_dim"),
            ("embed",),
            use_bias=False,
            dtype=dt,
            param_dtype=pdt,
            rngs=rngs,
        )
        if c.qk_norm:
            self.q_norm = RMSNorm(H, "head_dim", c.norm_eps, pdt)
            self.k_norm = RMSNorm(H, "head_dim", c.norm_eps, pdt)

    def __call__(
        self,
        x: Float[Array, "B T D"],
        positions: Int[Array, "B T"],
        mask: Bool[Array, "B 1 T S"],
        kv_cache: tuple[Array, Array] | None = None,
        cache_index: Int[Array, ""] | None = None,
        layer: Int[Array, ""] | None = None,
    ) -> tuple[Float[Array, "B T D"], tuple[Array, Array] | None]:
        """Without ``kv_cache`` S = T. With it (the whole stacked ``[L, B, S, K, H]`` k/v cache),
        k/v of the T new tokens are written into layer ``layer`` at slot ``cache_index`` and the
        queries attend over all S slots of that layer. Writing only the new slots into the
        stacked cache lets XLA update it in place inside the scan over layers (returning each
        layer's cache as a scan output instead copies the whole cache on every decode step)."""
        c = self.config
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        new_cache = None
        if kv_cache is not None:
            cache_k, cache_v = kv_cache
            start = (layer, 0, cache_index, 0, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), start)
            new_cache = (cache_k, cache_v)
            k, v = cache_k[layer].astype(q.dtype), cache_v[layer].astype(q.dtype)
        # Logits and softmax run in float32 inside dot_product_attention; K < N heads broadcast.
        y = jax.nn.dot_product_attention(q, k, v, mask=mask)
        return self.o_proj(y), new_cache


class MLP(nnx.Module):
    """SwiGLU feed-forward (Shazeer, "GLU Variants Improve Transformer", 2020)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dt, pdt = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        D, F = config.d_model, config.d_ff
        kw = dict(use_bias=False, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.gate_proj = Dense((D,), (F,), ("embed",), ("mlp",), **kw)
        self.up_proj = Dense((D,), (F,), ("embed",), ("mlp",), **kw)
        self.down_proj = Dense((F,), (D,), ("mlp",), ("embed",), **kw)

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    """Pre-norm decoder block."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(config.param_dtype)
        self.attn_norm = RMSNorm(config.d_model, "embed", config.norm_eps, pdt)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config.d_model, "embed", config.norm_eps, pdt)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, mask, kv_cache=None, cache_index=None, layer=None):
        h, new_cache = self.attn(self.attn_norm(x), positions, mask, kv_cache, cache_index, layer)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), new_cache


def attention_mask(
    q_segment_ids: Int[Array, "B T"],
    k_segment_ids: Int[Array, "B S"],
    q_slots: Int[Array, " T"],
    k_slots: Int[Array, " S"],
    q_positions: Int[Array, "B T"],
    k_positions: Int[Array, "B S"],
    sliding_window: int | None,
) -> Bool[Array, "B 1 T S"]:
    """``k_slot <= q_slot`` and ``seg_q == seg_k`` (and ``pos_q - pos_k < W``)."""
    mask = (k_slots[None, :] <= q_slots[:, None])[None]
    mask = mask & (q_segment_ids[:, :, None] == k_segment_ids[:, None, :])
    if sliding_window is not None:
        mask = mask & (q_positions[:, :, None] - k_positions[:, None, :] < sliding_window)
    return mask[:, None]


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    """Decoder returning final-normed hidden states; ``unembedding()`` gives ``[D, V]``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = Embed(config, rngs=rngs)

        @nnx.split_rngs(splits=config.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> Block:
            return Block(config, rngs=rngs)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(
            config.d_model, "embed", config.norm_eps, jnp.dtype(config.param_dtype)
        )
        if not config.tie_embeddings:
            self.unembed = Dense(
                (config.d_model,),
                (config.vocab_size,),
                ("embed",),
                ("vocab",),
                use_bias=False,
                dtype=jnp.dtype(config.dtype),
                param_dtype=jnp.dtype(config.param_dtype),
                rngs=rngs,
            )

    def unembedding(self) -> Float[Array, "D V"]:
        """Output projection: ``unembed.kernel``, or ``embedding.T`` when tied."""
        if self.config.tie_embeddings:
            return self.embed.embedding[...].T
        return self.unembed.kernel[...]

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"] | None = None,
        segment_ids: Int[Array, "B T"] | None = None,
    ) -> Float[Array, "B T D"]:
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        slots = jnp.arange(T)
        mask = attention_mask(
            segment_ids,
            segment_ids,
            slots,
            slots,
            positions,
            positions,
            self.config.sliding_window,
        )
        graphdef, layer_state = nnx.split(self.layers)

        def body(h, state):
            h, _ = nnx.merge(graphdef, state)(h, positions, mask)
            return h, None

        if self.config.remat != "none":
            body = jax.checkpoint(
                body, policy=_REMAT_POLICIES[self.config.remat], prevent_cse=False
            )
        h, _ = jax.lax.scan(body, self.embed(tokens), layer_state)
        return self.final_norm(h)

    def call_with_cache(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        cache: dict[str, Array],
        segment_ids: Int[Array, "B T"] | None = None,
    ) -> tuple[Float[Array, "B T D"], dict[str, Array]]:
        """Runs T new tokens against the KV cache (see ``jaxalign.models.cache``)."""
        B, T = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        index = cache["index"]
        start = (0, index)
        cache_segments = jax.lax.dynamic_update_slice(
            cache["segment_ids"], segment_ids.astype(jnp.int32), start
        )
        cache_positions = jax.lax.dynamic_update_slice(
            cache["positions"], positions.astype(jnp.int32), start
        )
        S = cache_segments.shape[1]
        mask = attention_mask(
            segment_ids,
            cache_segments,
            index + jnp.arange(T),
            jnp.arange(S),
            positions,
            cache_positions,
            self.config.sliding_window,
        )
        graphdef, layer_state = nnx.split(self.layers)

        def body(carry, xs):
            h, cache_k, cache_v = carry
            state, layer = xs
            block = nnx.merge(graphdef, state)
            h, (cache_k, cache_v) = block(h, positions, mask, (cache_k, cache_v), index, layer)
            return (h, cache_k, cache_v), None

        layers = jnp.arange(cache["k"].shape[0])
        carry = (self.embed(tokens), cache["k"], cache["v"])
        (h, k, v), _ = jax.lax.scan(body, carry, (layer_state, layers))
        new_cache = {
            "k": k,
            "v": v,
            "segment_ids": cache_segments,
            "positions": cache_positions,
            "index": index + T,
        }
        return self.final_norm(h), new_cache
