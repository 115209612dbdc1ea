"""Linear heads on the decoder's hidden states: a reward model's head (k outputs, one per
objective of a multi-objective reward model; k = 1 for a scalar reward) or a critic's value head.

A head is a small params tree stored next to the decoder's weights under its own name
(`params["reward_head"]`, `params["value_head"]`), so optimizer, sharding and checkpoints treat it
like any other parameter; the decoder module is untouched:

    head = {"kernel": [D, k], "bias": [k]},   r(h) = h . kernel + bias   [k]  (float32)

The scalar head is the k = 1 case (`init_scalar_head`, `apply_scalar_head`: r(h)[0]). A head
starts at zero, so every value is 0 at step 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxalign.models.config import ModelConfig

REWARD_HEAD = "reward_head"
VALUE_HEAD = "value_head"


def init_head(model_config: ModelConfig, outputs: int = 1, dtype=None) -> dict:
    """Zero head {"kernel": [D, k], "bias": [k]}, k = `outputs`."""
    dtype = dtype or model_config.param_dtype
    return {
        "kernel": jnp.zeros((model_config.d_model, outputs), dtype),
        "bias": jnp.zeros((outputs,), dtype),
    }


def abstract_head(model_config: ModelConfig, outputs: int = 1) -> dict:
    return jax.eval_shape(lambda: init_head(model_config, outputs))


def head_outputs(head: dict) -> int:
    """k, the number of outputs of a head (or of its abstract shapes)."""
    return head["bias"].shape[0]


def head_logical_axes() -> dict:
    return {"kernel": ("embed", None), "bias": (None,)}


def apply_head(head: dict, hidden: Float[Array, "... D"]) -> Float[Array, "... k"]:
    """r(h) = h . kernel + bias in float32, k values for every position of `hidden`."""
    kernel = head["kernel"].astype(jnp.float32)
    return hidden.astype(jnp.float32) @ kernel + head["bias"].astype(jnp.float32)


def init_scalar_head(model_config: ModelConfig, dtype=None) -> dict:
    """Zero one-output head {"kernel": [D, 1], "bias": [1]}."""
    return init_head(model_config, 1, dtype)


def abstract_scalar_head(model_config: ModelConfig) -> dict:
    return abstract_head(model_config, 1)


def scalar_head_logical_axes() -> dict:
    return head_logical_axes()


def apply_scalar_head(head: dict, hidden: Float[Array, "... D"]) -> Float[Array, "..."]:
    """v(h) = h . kernel[:, 0] + bias[0] in float32 (a one-output head), for every position."""
    return apply_head(head, hidden)[..., 0]


def decoder_params(params: dict) -> dict:
    """The decoder's params: a tree with its heads removed."""
    return {k: v for k, v in params.items() if k not in (REWARD_HEAD, VALUE_HEAD)}
