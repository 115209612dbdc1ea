"""Llama-family decoder as Flax NNX modules, with layers stacked on a leading axis and scanned.

One block (Touvron et al., "LLaMA", 2023):

    h = x + Attn(RMSNorm(x)),   y = h + MLP(RMSNorm(h)),   MLP(x) = W_down(silu(W_gate x) * W_up x)

Attention is grouped-query (Ainslie et al., "GQA", 2023): N query heads share K key/value heads.
Options cover Mistral (sliding window), Qwen2 (q/k/v bias), Qwen3 (RMSNorm over head_dim on q
and k before RoPE) and Gemma 2/3 (Gemma Team, 2024, 2025): RMSNorm scaling by ``1 + w``, norms
after attention and MLP as well as before (``h = x + N(Attn(N(x)))``), embeddings times sqrt(D),
GeGLU ``W_down(gelu_tanh(W_gate x) * W_up x)``, logits scaled by ``query_pre_attn_scalar ** -0.5``
and soft-capped (``c * tanh(s / c)``), local sliding-window layers interleaved with global ones,
each kind with its own RoPE base. The L blocks are created with ``nnx.vmap`` so every layer
parameter has a leading ``layers`` axis, and run with ``jax.lax.scan`` (compile time independent
of L; ``ModelConfig.layer_loop`` unrolls it, the default on CPU: ``layer_unroll``), the body
optionally rematerialised with ``jax.checkpoint``. What differs between layers
(local or global mask, RoPE frequencies) is data scanned alongside the layer params, derived from
the config at trace time (``local_layers``, ``layer_inv_freq``), never a parameter.

Masking: a query attends to a key when the key is not later (causal), both carry the same
segment id (packed sequences; 0 marks padding, which then only sees other padding, so no row of
the mask is empty), and, in local layers with ``sliding_window`` W, ``pos_q - pos_k < W``
(Hugging Face Mistral and Gemma).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int

from jaxalign.models.attention import (
    SplashMask,
    attend,
    block_diagonal_decode,
    causal_query_blocks,
    decode_attention,
    platform,
    resolve,
    splash_attention,
)
from jaxalign.models.config import LoraConfig, ModelConfig, local_layers
from jaxalign.models.rope import apply_rope, layer_inv_freq
from jaxalign.sharding.rules import ShardingRules, with_logical_constraint

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
    """``y = x / sqrt(mean(x^2) + eps) * scale`` over the last axis (Zhang & Sennrich, "Root Mean
    Square Layer Normalization", 2019). ``scale`` is the HF Llama weight (init ones); with
    ``plus_one`` the factor is ``1 + scale`` (the HF Gemma weight, init zeros). Computed in at
    least float32, cast back to the input dtype at the end (as HF Gemma does)."""

    def __init__(self, dim: int, axis_name: str, eps: float, param_dtype, plus_one: bool):
        self.eps = eps
        self.plus_one = plus_one
        init = "zeros" if plus_one else "ones"
        self.scale = _param(None, (dim,), (axis_name,), param_dtype, init)

    def __call__(self, x: Float[Array, "... X"]) -> Float[Array, "... X"]:
        compute = jnp.promote_types(x.dtype, jnp.float32)  # float32, or float64 under x64
        xf = x.astype(compute)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(compute)
        return (y * (1 + scale if self.plus_one else scale)).astype(x.dtype)


class LoraParam(nnx.Variable):
    """A LoRA adapter matrix: a variable of its own kind, so ``nnx.Param`` filters (the base
    params tree) never include it."""


def _adapter(shape, axes, dtype, lora: LoraConfig | None) -> LoraParam | None:
    if lora is None:
        return None
    return LoraParam(jnp.zeros(shape, dtype), out_sharding=axes, eager_sharding=False)


class Dense(nnx.Module):
    """``y = x . kernel (+ bias)``, contracting the trailing ``len(in_shape)`` axes of x with the
    leading axes of ``kernel [*in_shape, *out_shape]``. With ``lora`` it also holds an adapter
    ``lora_a [*in_shape, r]`` (logical axes: the input's, None) and ``lora_b [r, *out_shape]``
    (None, the output's) and adds ``(alpha / r) (x . lora_a) . lora_b``."""

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
        lora: LoraConfig | None = None,
    ):
        self.n_in = len(in_shape)
        self.dtype = dtype
        self.kernel = _param(rngs, in_shape + out_shape, in_axes + out_axes, param_dtype, "normal")
        self.bias = _param(None, out_shape, out_axes, param_dtype, "zeros") if use_bias else None
        # Placeholders (zeros): `jaxalign.models.lora.init_adapters` initialises adapters.
        r = lora.rank if lora is not None else 0
        self.lora_scale = lora.scale if lora is not None else None
        self.lora_dropout = lora.dropout if lora is not None else None
        self.lora_a = _adapter((*in_shape, r), (*in_axes, None), param_dtype, lora)
        self.lora_b = _adapter((r, *out_shape), (None, *out_axes), param_dtype, lora)

    def __call__(self, x: Array, dropout_key: jax.Array | None = None) -> Array:
        """``x . W (+ bias)``, plus ``s (drop(x) . A) . B`` when the layer carries an adapter; the
        adapter path never forms ``A B`` (no second [in, out] matrix, forward or backward).

        The matmuls are 2-D: the leading axes of x (batch, sequence) merged into one row axis,
        the kernel's input and output axes each into one. Then the weight gradient contracts a
        single axis of two plain matrices; with several, XLA's CPU backend writes the output
        gradient out transposed first, a strided copy fused with whatever produced it (the
        SwiGLU or RoPE backward), as slow as a quarter of the layer's backward. (Model fwd+bwd,
        Llama d=256 L=4, 64 x 191 rows: 3.42 -> 2.96 s.)"""
        lead = x.shape[: x.ndim - self.n_in]
        kernel = self.kernel[...]
        out_shape = kernel.shape[self.n_in :]
        fan_in = math.prod(kernel.shape[: self.n_in])
        x = x.reshape(-1, fan_in).astype(self.dtype)
        y = x @ kernel.reshape(fan_in, -1).astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].reshape(-1).astype(self.dtype)
        if self.lora_a is not None:
            if dropout_key is not None and self.lora_dropout > 0:
                keep = jax.random.bernoulli(dropout_key, 1.0 - self.lora_dropout, x.shape)
                x = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(self.dtype)
            u = x @ self.lora_a[...].reshape(fan_in, -1).astype(self.dtype)
            b = self.lora_b[...]
            y = y + self.lora_scale * (u @ b.reshape(b.shape[0], -1).astype(self.dtype))
        return y.reshape(*lead, *out_shape)


class Embed(nnx.Module):
    """Token embedding table ``embedding [V, D]``; with ``embed_scale`` the looked-up rows are
    multiplied by sqrt(D) in the compute dtype, the factor first rounded to float32 and then to
    that dtype (HF Gemma: sqrt(3072) = 55.43 becomes 55.5 in bfloat16)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(config.dtype)
        self.scale = np.float32(math.sqrt(config.d_model)) if config.embed_scale else None
        self.embedding = _param(
            rngs,
            (config.vocab_size, config.d_model),
            ("vocab", "embed"),
            jnp.dtype(config.param_dtype),
            "normal",
        )

    def __call__(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
        x = jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)
        return x if self.scale is None else x * jnp.asarray(self.scale).astype(self.dtype)


def _lora_for(config: ModelConfig, block: str):
    """``name -> LoraConfig or None``: whether projection ``{block}.{name}_proj`` carries an
    adapter (``config.lora.targets``)."""
    modules = config.lora.modules() if config.lora is not None else ()
    return lambda name: config.lora if f"{block}.{name}_proj" in modules else None


def _split(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    """``n`` independent dropout keys (or ``n`` Nones without a key)."""
    return [None] * n if key is None else list(jax.random.split(key, n))


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional q/k/v bias, q/k RMSNorm, query scaling
    and logit soft-capping."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        kw = dict(use_bias=c.qkv_bias, dtype=dt, param_dtype=pdt, rngs=rngs)
        D, N, K, H = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
        lora = _lora_for(c, "attn")
        self.q_proj = Dense((D,), (N, H), ("embed",), ("heads", "head_dim"), **kw, lora=lora("q"))
        self.k_proj = Dense(
            (D,), (K, H), ("embed",), ("kv_heads", "head_dim"), **kw, lora=lora("k")
        )
        self.v_proj = Dense(
            (D,), (K, H), ("embed",), ("kv_heads", "head_dim"), **kw, lora=lora("v")
        )
        self.o_proj = Dense(
            (N, H),
            (D,),
            ("heads", "head_dim"),
            ("embed",),
            use_bias=False,
            dtype=dt,
            param_dtype=pdt,
            rngs=rngs,
            lora=lora("o"),
        )
        if c.qk_norm:
            self.q_norm = RMSNorm(H, "head_dim", c.norm_eps, pdt, c.norm_plus_one)
            self.k_norm = RMSNorm(H, "head_dim", c.norm_eps, pdt, c.norm_plus_one)

    def __call__(
        self,
        x: Float[Array, "B T D"],
        positions: Int[Array, "B T"],
        mask: Bool[Array, "B 1 T S"] | SplashMask,
        inv_freq: Float[Array, " H2"],
        kv_cache: tuple[Array, Array] | None = None,
        cache_index: Int[Array, ""] | None = None,
        layer: Int[Array, ""] | None = None,
        dropout_key: jax.Array | None = None,
        query_blocks: int = 1,
        block_diagonal: bool = False,
    ) -> tuple[Float[Array, "B T D"], tuple[Array, Array] | None]:
        """Without ``kv_cache`` S = T. With it (the whole stacked ``[L, B, S, K, H]`` k/v cache),
        k/v of the T new tokens are written into layer ``layer`` at slot ``cache_index`` and the
        queries attend over all S slots of that layer. Writing only the new slots into the
        stacked cache lets XLA update it in place inside the scan over layers (returning each
        layer's cache as a scan output instead copies the whole cache on every decode step).
        ``inv_freq`` are this layer's RoPE frequencies; ``dropout_key`` drives the adapters'
        dropout (training). A ``SplashMask`` in place of ``mask`` (the model's forward with the
        splash kernel, never with a cache) runs ``splash_attention``. ``query_blocks``: ``attend``'s
        causal query blocks, which the model passes only to its full-sequence forward (S = T, never
        with a cache). ``block_diagonal`` (a decode step with a cache, on CPU:
        ``block_diagonal_decode``) runs ``decode_attention``."""
        c = self.config
        keys = _split(dropout_key, 4)
        q, k, v = self.q_proj(x, keys[0]), self.k_proj(x, keys[1]), self.v_proj(x, keys[2])
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        new_cache = None
        if kv_cache is not None:
            cache_k, cache_v = kv_cache
            start = (layer, 0, cache_index, 0, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), start)
            new_cache = (cache_k, cache_v)
            k, v = cache_k[layer].astype(q.dtype), cache_v[layer].astype(q.dtype)
        pre = c.query_pre_attn_scalar
        scale = 1 / math.sqrt(c.head_dim) if pre is None else pre**-0.5
        if block_diagonal:
            y = decode_attention(q, k, v, mask, scale=scale, softcap=c.attn_logit_softcap)
        elif isinstance(mask, SplashMask):
            y = splash_attention(
                q,
                k,
                v,
                mask.segment_ids,
                local=mask.local,
                window=c.sliding_window,
                scale=scale,
                softcap=c.attn_logit_softcap,
                mesh=mask.mesh,
                rules=mask.rules,
            )
        elif c.attn_logit_softcap is None:
            # Logits and softmax run in float32; K < N heads broadcast. Decode steps: XLA.
            impl = c.attention if kv_cache is None else "xla"
            y = attend(q, k, v, mask, scale=scale, implementation=impl, query_blocks=query_blocks)
        else:  # dot_product_attention has no soft-cap
            y = softcapped_attention(q, k, v, mask, scale, c.attn_logit_softcap)
        return self.o_proj(y, keys[3]), new_cache


def softcapped_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    mask: Bool[Array, "B 1 T S"],
    scale: float,
    cap: float,
) -> Float[Array, "B T N H"]:
    """``softmax(mask(c * tanh(s q.k / c))) v`` with logits and softmax in float32 (Gemma 2).

    Query head n uses key/value head ``n // (N / K)`` (HF ``repeat_kv``); masked logits are set to
    the float32 minimum, as ``jax.nn.dot_product_attention`` does.
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, H)
    s = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    s = cap * jnp.tanh(s / cap)
    s = jnp.where(mask[:, :, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", p, v).reshape(B, T, N, H)


class MLP(nnx.Module):
    """SwiGLU or (``activation="gelu_tanh"``) GeGLU feed-forward (Shazeer, "GLU Variants Improve
    Transformer", 2020); gelu_tanh(x) = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dt, pdt = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        self.gelu = config.activation == "gelu_tanh"
        D, F = config.d_model, config.d_ff
        kw = dict(use_bias=False, dtype=dt, param_dtype=pdt, rngs=rngs)
        lora = _lora_for(config, "mlp")
        self.gate_proj = Dense((D,), (F,), ("embed",), ("mlp",), **kw, lora=lora("gate"))
        self.up_proj = Dense((D,), (F,), ("embed",), ("mlp",), **kw, lora=lora("up"))
        self.down_proj = Dense((F,), (D,), ("mlp",), ("embed",), **kw, lora=lora("down"))

    def __call__(
        self, x: Float[Array, "B T D"], dropout_key: jax.Array | None = None
    ) -> Float[Array, "B T D"]:
        keys = _split(dropout_key, 3)
        gate = self.gate_proj(x, keys[0])
        gate = jax.nn.gelu(gate, approximate=True) if self.gelu else jax.nn.silu(gate)
        return self.down_proj(gate * self.up_proj(x, keys[1]), keys[2])


class Block(nnx.Module):
    """Pre-norm decoder block; with ``post_norms`` also normed after attention and MLP."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(config.param_dtype)

        def norm():
            return RMSNorm(config.d_model, "embed", config.norm_eps, pdt, config.norm_plus_one)

        self.attn_norm = norm()
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = norm()
        self.mlp = MLP(config, rngs=rngs)
        if config.post_norms:
            self.attn_post_norm = norm()
            self.mlp_post_norm = norm()
        self.post_norms = config.post_norms

    def __call__(
        self,
        x,
        positions,
        mask,
        inv_freq,
        kv_cache=None,
        cache_index=None,
        layer=None,
        dropout_key=None,
        query_blocks=1,
        block_diagonal=False,
    ):
        keys = _split(dropout_key, 2)
        h, new_cache = self.attn(
            self.attn_norm(x),
            positions,
            mask,
            inv_freq,
            kv_cache,
            cache_index,
            layer,
            keys[0],
            query_blocks,
            block_diagonal,
        )
        x = x + (self.attn_post_norm(h) if self.post_norms else h)
        h = self.mlp(self.mlp_norm(x), keys[1])
        return x + (self.mlp_post_norm(h) if self.post_norms else h), new_cache


def layer_unroll(layer_loop: str, mesh=None) -> bool:
    """Whether the layer scan unrolls for ``ModelConfig.layer_loop`` on ``platform(mesh)``:
    "unroll" yes, "scan" no, "auto" on a CPU platform only."""
    return layer_loop == "unroll" or (layer_loop == "auto" and platform(mesh) == "cpu")


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


def _residual(h: Float[Array, "B T D"], mesh, rules) -> Float[Array, "B T D"]:
    """The residual stream constrained to its logical axes ("batch", "seq", "act_embed") on
    ``mesh`` under sharding ``rules``; as it is without rules."""
    if rules is None:
        return h
    return with_logical_constraint(h, ("batch", "seq", "act_embed"), rules, mesh)


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
            config.d_model,
            "embed",
            config.norm_eps,
            jnp.dtype(config.param_dtype),
            config.norm_plus_one,
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
        *,
        mesh: Mesh | None = None,
        rules: ShardingRules | None = None,
        dropout_key: jax.Array | None = None,
    ) -> Float[Array, "B T D"]:
        """With `rules`, the residual stream (after the embedding and after every block) is
        constrained to its logical axes ("batch", "seq", "act_embed") on `mesh` (or the mesh set
        with `jax.set_mesh`; none: no constraint). `dropout_key` (training with LoRA dropout)
        gives every layer and adapter its own dropout mask. When the attention resolves to
        ``"splash"`` for T (``attention.resolve``) no dense mask is built: every layer gets a
        ``SplashMask`` (segment ids, its local flag, `mesh` and `rules` for the kernel's
        ``shard_map``)."""
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        slots = jnp.arange(T)
        splash = resolve(self.config.attention, T, mesh) == "splash"
        blocks = 1 if splash else causal_query_blocks(T, mesh)
        if not splash:
            masks = self._masks(segment_ids, segment_ids, slots, slots, positions, positions)
        graphdef, layer_state = nnx.split(self.layers)

        def body(h, xs):
            state, local, inv_freq, key = xs
            if splash:
                mask = SplashMask(segment_ids, local, mesh, rules)
            else:
                mask = jnp.where(local, masks[1], masks[0])
            block = nnx.merge(graphdef, state)
            h, _ = block(h, positions, mask, inv_freq, dropout_key=key, query_blocks=blocks)
            return _residual(h, mesh, rules), None

        if self.config.remat != "none":
            body = jax.checkpoint(
                body, policy=_REMAT_POLICIES[self.config.remat], prevent_cse=False
            )
        L = self.config.n_layers
        keys = None if dropout_key is None else jax.random.split(dropout_key, L)
        xs = (layer_state, *self._layer_data(), keys)
        unroll = layer_unroll(self.config.layer_loop, mesh)
        h0 = _residual(self.embed(tokens), mesh, rules)
        h, _ = jax.lax.scan(body, h0, xs, unroll=unroll)
        return self.final_norm(h)

    def call_grouped(
        self,
        tokens: Int[Array, "R T"],
        positions: Int[Array, "R T"],
        segment_ids: Int[Array, "R T"],
        *,
        group: int,
        prefix: int,
        mesh: Mesh | None = None,
        rules: ShardingRules | None = None,
    ) -> Float[Array, "R S D"]:
        """Final-normed hidden states of columns ``[prefix, T)`` (P = ``prefix``) of rows that
        come in groups of ``group`` consecutive rows sharing their first P columns (tokens,
        positions and segment ids: the n completions of one prompt). The shared columns run
        once per group (R / group rows), their keys and values are repeated to the group's rows,
        and the other columns attend to them and to their own causally: the values of
        ``__call__``'s columns ``[P, T)``, without (group - 1) / group of the prompt's work
        (forward and backward; the keys' and values' gradients sum over the group). Only rows
        that really share their first P columns may be passed: nothing checks it here.

        Attention runs as the cached forward's (``attend``'s XLA path or the soft-capped one),
        so callers take this path where ``__call__`` would run ``"xla"`` too
        (``attention.resolve``). ``mesh``/``rules`` constrain the residual streams as
        ``__call__`` does; ``remat`` applies likewise."""
        R, T = tokens.shape
        B, P, S = R // group, prefix, T - prefix
        c = self.config
        shared = [x[::group, :P] for x in (tokens, positions, segment_ids)]
        own = [x[:, P:] for x in (tokens, positions, segment_ids)]
        p_slots = jnp.arange(P)
        p_masks = self._masks(shared[2], shared[2], p_slots, p_slots, shared[1], shared[1])
        k_segments = jnp.concatenate([jnp.repeat(shared[2], group, axis=0), own[2]], axis=1)
        k_positions = jnp.concatenate([jnp.repeat(shared[1], group, axis=0), own[1]], axis=1)
        s_masks = self._masks(
            own[2], k_segments, P + jnp.arange(S), jnp.arange(T), own[1], k_positions
        )
        graphdef, layer_state = nnx.split(self.layers)
        dtype = jnp.dtype(c.dtype)
        zeros = jnp.zeros((1, B, P, c.n_kv_heads, c.head_dim), dtype)
        empty = jnp.zeros((1, R, S, c.n_kv_heads, c.head_dim), dtype)

        def body(carry, xs):
            h_shared, h_own = carry
            state, local, inv_freq = xs
            block = nnx.merge(graphdef, state)
            mask = jnp.where(local, p_masks[1], p_masks[0])
            # The shared columns as a prefill into a cache of exactly their P slots.
            h_shared, (k, v) = block(h_shared, shared[1], mask, inv_freq, (zeros, zeros), 0, 0)
            cache = tuple(
                jnp.concatenate([jnp.repeat(x, group, axis=1), empty], axis=2) for x in (k, v)
            )
            mask = jnp.where(local, s_masks[1], s_masks[0])
            h_own, _ = block(h_own, own[1], mask, inv_freq, cache, P, 0)
            return (_residual(h_shared, mesh, rules), _residual(h_own, mesh, rules)), None

        if c.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[c.remat], prevent_cse=False)
        carry = tuple(_residual(self.embed(x[0]), mesh, rules) for x in (shared, own))
        xs = (layer_state, *self._layer_data())
        unroll = layer_unroll(c.layer_loop, mesh)
        (_, h), _ = jax.lax.scan(body, carry, xs, unroll=unroll)
        return self.final_norm(h)

    def _masks(self, *args) -> tuple[Bool[Array, "B 1 T S"], Bool[Array, "B 1 T S"]]:
        """(global, local) masks from the ``attention_mask`` arguments (window aside)."""
        full = attention_mask(*args, None)
        window = self.config.sliding_window
        return full, full if window is None else attention_mask(*args, window)

    def _layer_data(self) -> tuple[np.ndarray, np.ndarray]:
        """Scanned per-layer data: ``[L]`` local flags and ``[L, H/2]`` RoPE frequencies."""
        return local_layers(self.config), layer_inv_freq(self.config)

    def call_with_cache(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        cache: dict[str, Array],
        segment_ids: Int[Array, "B T"] | None = None,
        *,
        alternatives: bool = False,
        mesh: Mesh | None = None,
    ) -> tuple[Float[Array, "B T D"], dict[str, Array]]:
        """Runs T new tokens against the KV cache (see ``jaxalign.models.cache``); ``mesh``:
        where it runs (``platform(mesh)``: a decode step on CPU attends by
        ``decode_attention``).

        ``alternatives``: the T tokens are candidates for one next position (search-time
        decoding scores each one): each attends to the slots before ``index`` and to itself,
        never to another candidate, and ``index`` is not advanced (the slots written past it are
        rewritten by the next real token before any query can see them). The cache needs T - 1
        slots to spare past the last real token (``dynamic_update_slice`` clamps otherwise)."""
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
        masks = self._masks(
            segment_ids,
            cache_segments,
            index + jnp.arange(T),
            jnp.arange(S),
            positions,
            cache_positions,
        )
        if alternatives:
            q_slots, k_slots = index + jnp.arange(T), jnp.arange(S)
            own = (k_slots[None, :] < index) | (k_slots[None, :] == q_slots[:, None])
            masks = tuple(m & own[None, None] for m in masks)
        graphdef, layer_state = nnx.split(self.layers)
        block_diagonal = block_diagonal_decode(T, mesh)

        def body(carry, xs):
            h, cache_k, cache_v = carry
            state, local, inv_freq, layer = xs
            mask = jnp.where(local, masks[1], masks[0])
            block = nnx.merge(graphdef, state)
            h, (cache_k, cache_v) = block(
                h,
                positions,
                mask,
                inv_freq,
                (cache_k, cache_v),
                index,
                layer,
                block_diagonal=block_diagonal,
            )
            return (h, cache_k, cache_v), None

        layers = jnp.arange(cache["k"].shape[0])
        carry = (self.embed(tokens), cache["k"], cache["v"])
        xs = (layer_state, *self._layer_data(), layers)
        (h, k, v), _ = jax.lax.scan(body, carry, xs)
        new_cache = {
            "k": k,
            "v": v,
            "segment_ids": cache_segments,
            "positions": cache_positions,
            "index": index if alternatives else index + T,
        }
        return self.final_norm(h), new_cache
