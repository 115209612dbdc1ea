"""Functional face of the model: plain-dict params in, arrays out.

Params are the pure dict of the ``Transformer``'s ``nnx.Param`` state (layout in
``jaxalign.models``). Each call rebuilds the module from the params with ``nnx.merge`` at trace
time, so these functions are cheap under ``jax.jit`` and differentiable w.r.t. ``params``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxalign.models.config import ModelConfig
from jaxalign.models.transformer import LoraParam, Transformer

Params = dict[str, Any]


ADAPTERS = "lora"  # params[ADAPTERS]: the LoRA adapters tree, when the forward uses them
DROPOUT_KEY = "lora_dropout_key"  # params[DROPOUT_KEY]: the adapters' dropout key (training)


@functools.lru_cache(maxsize=64)
def _abstract(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Graph definition and abstract (ShapeDtypeStruct) base params and LoRA adapters (empty
    without ``config.lora``) of the model; no allocation."""
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    return nnx.split(model, nnx.Param, LoraParam)


def bind(config: ModelConfig, params: Params) -> Transformer:
    """The NNX ``Transformer`` holding ``params`` (inverse of ``nnx.state(model).to_pure_dict``).

    Params that carry adapters (``params["lora"]``, see ``jaxalign.models.lora.attach``) bind
    the adapted model of ``config.lora``; without them the base model runs, whatever
    ``config.lora`` says (the reference policy of a LoRA run is the base with adapters off)."""
    adapters = params.get(ADAPTERS)
    if adapters is None:
        return nnx.merge(_abstract(config.replace(lora=None))[0], params)
    if config.lora is None:
        raise ValueError('params carry LoRA adapters ("lora") but ModelConfig.lora is None')
    base = {k: v for k, v in params.items() if k not in (ADAPTERS, DROPOUT_KEY)}
    return nnx.merge(_abstract(config)[0], base, adapters)


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Random params: normal(0.02) kernels and embeddings, ones for norms (zeros for the ``1 + w``
    norms of ``norm_plus_one``), zeros for biases. The base weights only: the same with or
    without ``config.lora`` (adapters: ``jaxalign.models.lora.init_adapters``).

    Jittable with ``config`` static: ``jax.jit(init_params, static_argnums=0, out_shardings=...)``.
    """
    model = Transformer(config.replace(lora=None), rngs=nnx.Rngs(params=rng))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract_params(config: ModelConfig) -> Params:
    """``jax.ShapeDtypeStruct`` tree with the structure of ``init_params(config, rng)``."""
    return nnx.to_pure_dict(_abstract(config)[1])


def logical_axes_of(state: nnx.State) -> dict[str, Any]:
    """Same tree as ``state``'s pure dict, each leaf the tuple of logical axis names of that
    variable."""
    tree: dict[str, Any] = {}
    for path, variable in nnx.to_flat_state(state):
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = tuple(variable.get_metadata()["out_sharding"])
    return tree


def param_logical_axes(config: ModelConfig) -> dict[str, Any]:
    """Same tree as the params, each leaf the tuple of logical axis names of that parameter
    (``layers, vocab, embed, heads, kv_heads, head_dim, mlp``)."""
    return logical_axes_of(_abstract(config)[1])


def param_count(config: ModelConfig) -> int:
    """Number of parameters, from shapes only (tied embeddings counted once)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)))


def forward(
    config: ModelConfig,
    params: Params,
    tokens: Int[Array, "B T"],
    positions: Int[Array, "B T"] | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
    *,
    mesh=None,
    rules=None,
) -> Float[Array, "B T D"]:
    """Final-normed hidden states. ``positions`` default ``arange(T)``; ``segment_ids`` (0 =
    padding) restrict attention to tokens of the same packed sequence. With sharding ``rules``
    (and a ``mesh``) the activations are annotated with their logical axes (`Transformer`).
    Params with adapters run the adapted model, with adapter dropout when they also carry a
    dropout key (`bind`, ``jaxalign.models.lora.attach``)."""
    model = bind(config, params)
    key = params.get(DROPOUT_KEY)
    return model(tokens, positions, segment_ids, mesh=mesh, rules=rules, dropout_key=key)


def forward_grouped(
    config: ModelConfig,
    params: Params,
    tokens: Int[Array, "R T"],
    positions: Int[Array, "R T"],
    segment_ids: Int[Array, "R T"],
    *,
    group: int,
    prefix: int,
    mesh=None,
    rules=None,
) -> Float[Array, "R S D"]:
    """``forward(...)[:, prefix:]`` for rows in groups of ``group`` consecutive rows that share
    their first ``prefix`` columns (a prompt's n completions), computing the shared columns once
    per group (`Transformer.call_grouped`). Adapters as in `forward`; params carrying a dropout
    key (adapter dropout in training) are refused with ValueError: `forward` runs that."""
    if params.get(DROPOUT_KEY) is not None:
        raise ValueError("forward_grouped does not run adapter dropout; use forward")
    return bind(config, params).call_grouped(
        tokens, positions, segment_ids, group=group, prefix=prefix, mesh=mesh, rules=rules
    )


def unembedding(config: ModelConfig, params: Params) -> Float[Array, "D V"]:
    """Output projection ``[D, V]``: ``unembed.kernel`` or, when tied, ``embed.embedding.T``."""
    if config.tie_embeddings:
        return params["embed"]["embedding"].T
    return params["unembed"]["kernel"]


def logits(
    config: ModelConfig, params: Params, hidden: Float[Array, "B T D"]
) -> Float[Array, "B T V"]:
    """float32 logits ``z = hidden @ unembedding``, soft-capped to ``c * tanh(z / c)`` with
    ``final_logit_softcap`` c; for sampling one step at a time, not training (the log-prob kernels
    take the same cap)."""
    w = unembedding(config, params)
    z = jnp.einsum(
        "btd,dv->btv", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32
    )
    cap = config.final_logit_softcap
    return z if cap is None else cap * jnp.tanh(z / cap)
