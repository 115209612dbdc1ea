"""Scalar heads on the decoder's hidden states: a reward model's or a critic's value head.

A head is a small params tree stored next to the decoder's weights under its own name
(`params["reward_head"]`, `params["value_head"]`), so optimizer, sharding and checkpoints treat it
like any other parameter; the decoder module is untouched:

    head = {"kernel": [D, 1], "bias": [1]},   v(h) = h . kernel[:, 0] + bias[0]   (float32)

It starts at zero, so every value is 0 at step 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxalign.models.config import ModelConfig

REWARD_HEAD = "reward_head"
VALUE_HEAD = "value_head"


def init_scalar_head(model_config: ModelConfig, dtype=None) -> dict:
    """Zero head {"kernel": [D, 1], "bias": [1]}."""
    dtype = dtype or model_config.param_dtype
    return {
        "kernel": jnp.zeros((model_config.d_model, 1), dtype),
        "bias": jnp.zeros((1,), dtype),
    }


def abstract_scalar_head(model_config: ModelConfig) -> dict:
    return jax.eval_shape(lambda: init_scalar_head(model_config))


def scalar_head_logical_axes() -> dict:
    return {"kernel": ("embed", None), "bias": (None,)}


def apply_scalar_head(head: dict, hidden: Float[Array, "... D"]) -> Float[Array, "..."]:
    """v(h) = h . kernel[:, 0] + bias[0] in float32, for every position of `hidden`."""
    kernel = head["kernel"][:, 0].astype(jnp.float32)
    return hidden.astype(jnp.float32) @ kernel + head["bias"][0].astype(jnp.float32)


def decoder_params(params: dict) -> dict:
    """The decoder's params: a tree with its heads removed."""
    return {k: v for k, v in params.items() if k not in (REWARD_HEAD, VALUE_HEAD)}
