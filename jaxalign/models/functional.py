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
from jaxalign.models.transformer import Transformer

Params = dict[str, Any]


@functools.lru_cache(maxsize=64)
def _abstract(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and abstract (ShapeDtypeStruct) state of the model; no allocation."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))


def bind(config: ModelConfig, params: Params) -> Transformer:
    """The NNX ``Transformer`` holding ``params`` (inverse of ``nnx.state(model).to_pure_dict``)."""
    graphdef, _ = _abstract(config)
    return nnx.merge(graphdef, params)


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Random params: normal(0.02) kernels and embeddings, ones for norms (zeros for the ``1 + w``
    norms of ``norm_plus_one``), zeros for biases.

    Jittable with ``config`` static: ``jax.jit(init_params, static_argnums=0, out_shardings=...)``.
    """
    model = Transformer(config, rngs=nnx.Rngs(params=rng))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract_params(config: ModelConfig) -> Params:
    """``jax.ShapeDtypeStruct`` tree with the structure of ``init_params(config, rng)``."""
    return nnx.to_pure_dict(_abstract(config)[1])


def param_logical_axes(config: ModelConfig) -> dict[str, Any]:
    """Same tree as the params, each leaf the tuple of logical axis names of that parameter
    (``layers, vocab, embed, heads, kv_heads, head_dim, mlp``)."""
    tree: dict[str, Any] = {}
    for path, variable in nnx.to_flat_state(_abstract(config)[1]):
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = tuple(variable.get_metadata()["out_sharding"])
    return tree


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
    (and a ``mesh``) the activations are annotated with their logical axes (`Transformer`)."""
    return bind(config, params)(tokens, positions, segment_ids, mesh=mesh, rules=rules)


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
