"""LoRA adapters as a params tree of their own (Hu et al., "LoRA: Low-Rank Adaptation of Large
Language Models", 2021).

A targeted projection ``y = x . W`` becomes

    y = x . W + (alpha / r) (dropout(x) . A) . B,   A [*in, r], B [r, *out]

(``ModelConfig.lora``: rank r, alpha, dropout, targets). The adapters mirror the base params'
paths, stacked on the layer axis like every layer parameter:

    {"layers": {"attn": {"q_proj": {"lora_a": [L, D, r], "lora_b": [L, r, N, H]}, ...},
                "mlp": {"down_proj": {"lora_a": [L, F, r], "lora_b": [L, r, D]}, ...}}}

with logical axes ("layers", <the input's axes>, None) and ("layers", None, <the output's axes>),
so FSDP / tensor-parallel rules shard them like their base matrix. A is uniform in
±1 / sqrt(fan_in) (PEFT's Kaiming-uniform default), B is 0: the adapted model equals the base at
initialisation.

The forward runs the adapters next to the base matmul (``Dense``), never forming ``A B`` or
``W + A B``: the base weights exist once, and the extra memory is the adapters, their gradients
and optimizer state, and activations of width r. (Merging W + s A B inside the step would build a
second copy of every targeted matrix and its full-size gradient, and cannot express dropout on the
adapter input.) ``merge_adapters`` folds them into the base for export.

Use: ``forward(config, attach(params, adapters), ...)`` runs the adapted model; ``forward(config,
params, ...)`` the base, which is how a LoRA run's reference policy costs no second copy.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models.config import ModelConfig
from jaxalign.models.functional import (
    ADAPTERS,
    DROPOUT_KEY,
    Params,
    _abstract,
    logical_axes_of,
)

Adapters = dict[str, Any]


def _adapter_state(config: ModelConfig) -> nnx.State:
    if config.lora is None:
        raise ValueError("ModelConfig.lora is None: the model has no adapters")
    return _abstract(config)[2]


def abstract_adapters(config: ModelConfig) -> Adapters:
    """``jax.ShapeDtypeStruct`` tree of the adapters of ``config.lora``."""
    return nnx.to_pure_dict(_adapter_state(config))


def adapter_logical_axes(config: ModelConfig) -> Adapters:
    """Logical axis names of every adapter matrix (``lora_a``: the input's axes then None,
    ``lora_b``: None then the output's), for ``jaxalign.sharding.named_shardings``."""
    return logical_axes_of(_adapter_state(config))


def adapter_count(config: ModelConfig) -> int:
    """Number of adapter parameters: r (in + out) per targeted matrix and layer."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_adapters(config)))


def init_adapters(config: ModelConfig, rng: jax.Array) -> Adapters:
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (fan_in = the projection's input width), B = 0.

    Jittable with ``config`` static: ``jax.jit(init_adapters, static_argnums=0,
    out_shardings=...)``."""
    flat = nnx.to_flat_state(_adapter_state(config))
    values = {}
    for i, (path, variable) in enumerate(flat):
        shape, dtype = variable.get_value().shape, variable.get_value().dtype
        if path[-1] == "lora_a":  # [L, *in, r]
            bound = 1.0 / math.sqrt(math.prod(shape[1:-1]))
            key = jax.random.fold_in(rng, i)
            value = jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)
        else:
            value = jnp.zeros(shape, dtype)
        node = values
        for key_part in path[:-1]:
            node = node.setdefault(key_part, {})
        node[path[-1]] = value
    return values


def attach(params: Params, adapters: Adapters, dropout_key: jax.Array | None = None) -> Params:
    """The params of the adapted model: ``params`` (not copied) with ``adapters`` under
    ``"lora"`` and, for a training forward with ``LoraConfig.dropout`` > 0, the dropout key."""
    out = params | {ADAPTERS: adapters}
    return out if dropout_key is None else out | {DROPOUT_KEY: dropout_key}


def merge_adapters(config: ModelConfig, params: Params, adapters: Adapters) -> Params:
    """Base params with every adapter folded in: ``W' = W + (alpha / r) A B`` per layer (for
    export; the result is a full second copy of the targeted matrices)."""
    scale = config.lora.scale
    merged = jax.tree.map(lambda x: x, params)  # new dicts, same arrays

    def fold(kernel, a, b):  # [L, *in, *out], [L, *in, r], [L, r, *out]
        compute = jnp.promote_types(kernel.dtype, jnp.float32)  # float32, or float64 under x64
        delta = jax.vmap(lambda a_l, b_l: jnp.tensordot(a_l, b_l, 1))(
            a.astype(compute), b.astype(compute)
        )
        return (kernel.astype(compute) + scale * delta).astype(kernel.dtype)

    for block, modules in adapters["layers"].items():
        for name, ab in modules.items():
            target = merged["layers"][block][name]
            target["kernel"] = fold(target["kernel"], ab["lora_a"], ab["lora_b"])
    return merged
