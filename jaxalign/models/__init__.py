"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5/3, Gemma 2/3) as Flax NNX modules +
functional face.

Params are a plain nested dict with layers stacked on a leading axis L:

    {"embed": {"embedding": [V, D]},
     "layers": {"attn_norm": {"scale": [L, D]},
                "attn": {"q_proj": {"kernel": [L, D, N, H], "bias": [L, N, H] (qkv_bias)},
                         "k_proj": {"kernel": [L, D, K, H], "bias": [L, K, H] (qkv_bias)},
                         "v_proj": {"kernel": [L, D, K, H], "bias": [L, K, H] (qkv_bias)},
                         "o_proj": {"kernel": [L, N, H, D]},
                         "q_norm": {"scale": [L, H]}, "k_norm": {"scale": [L, H]} (qk_norm)},
                "attn_post_norm": {"scale": [L, D]} (post_norms),
                "mlp_norm": {"scale": [L, D]},
                "mlp": {"gate_proj": {"kernel": [L, D, F]}, "up_proj": {"kernel": [L, D, F]},
                        "down_proj": {"kernel": [L, F, D]}},
                "mlp_post_norm": {"scale": [L, D]} (post_norms)},
     "final_norm": {"scale": [D]},
     "unembed": {"kernel": [D, V]}}   (absent when tie_embeddings)

LoRA adapters (``ModelConfig.lora``) are a separate tree (``jaxalign.models.lora``), attached to
the params under "lora" for the forwards that use them.
"""

from jaxalign.models.cache import forward_with_cache, init_cache
from jaxalign.models.config import (
    LORA_MODULES,
    PRESETS,
    LoraConfig,
    ModelConfig,
    RopeScaling,
    get_preset,
    local_layers,
)
from jaxalign.models.functional import (
    ADAPTERS,
    Params,
    abstract_params,
    bind,
    forward,
    forward_grouped,
    init_params,
    logits,
    param_count,
    param_logical_axes,
    unembedding,
)
from jaxalign.models.lora import (
    abstract_adapters,
    adapter_count,
    adapter_logical_axes,
    attach,
    init_adapters,
    merge_adapters,
)
from jaxalign.models.rope import apply_rope, layer_inv_freq, rope_inv_freq
from jaxalign.models.transformer import (
    MLP,
    Attention,
    Block,
    Dense,
    Embed,
    LoraParam,
    RMSNorm,
    Transformer,
    attention_mask,
    softcapped_attention,
)

__all__ = [
    "ADAPTERS",
    "LORA_MODULES",
    "MLP",
    "PRESETS",
    "Attention",
    "Block",
    "Dense",
    "Embed",
    "LoraConfig",
    "LoraParam",
    "ModelConfig",
    "Params",
    "RMSNorm",
    "RopeScaling",
    "Transformer",
    "abstract_adapters",
    "abstract_params",
    "adapter_count",
    "adapter_logical_axes",
    "apply_rope",
    "attach",
    "attention_mask",
    "bind",
    "forward",
    "forward_grouped",
    "forward_with_cache",
    "get_preset",
    "init_adapters",
    "init_cache",
    "init_params",
    "layer_inv_freq",
    "local_layers",
    "logits",
    "merge_adapters",
    "param_count",
    "param_logical_axes",
    "rope_inv_freq",
    "softcapped_attention",
    "unembedding",
]
