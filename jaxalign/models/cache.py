"""Key/value cache for prefill and incremental decoding.

The cache is a plain dict (a pytree; donate it to the jitted step):

    k, v         [L, B, S, K, H]  keys (after RoPE) and values of every written slot
    segment_ids  [B, S] int32     segment of each slot; 0 = empty or padding (never attended to
                                  by real tokens)
    positions    [B, S] int32     RoPE position of each slot (used by the sliding window)
    index        [] int32         next slot to write (shared by the batch)

Prefill writes a prompt of length T into slots ``[0, T)``; each decode step writes one token at
``index``. Prompts of different lengths are left-padded (or right-padded) to a common T with
``segment_ids = 0`` on padding and per-example ``positions`` counting real tokens from 0; decode
steps then pass each example's next position. A query attends to slots not after its own, in its
own segment, within the sliding window: exactly the keys the full forward would see.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxalign.models.config import ModelConfig
from jaxalign.models.functional import Params, bind


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> dict[str, Array]:
    """Empty cache for ``batch`` rows of ``max_len`` slots (``dtype`` defaults to config.dtype)."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
        "positions": jnp.zeros((batch, max_len), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def forward_with_cache(
    config: ModelConfig,
    params: Params,
    tokens: Int[Array, "B T"],
    positions: Int[Array, "B T"],
    cache: dict[str, Array],
    segment_ids: Int[Array, "B T"] | None = None,
) -> tuple[Float[Array, "B T D"], dict[str, Array]]:
    """Hidden states of T new tokens and the updated cache (``index`` advanced by T).

    ``segment_ids`` default to 1 (one sequence per row); pass 0 on padded prompt slots. Writing
    past ``max_len`` is not checked inside jit: ``dynamic_update_slice`` would clamp the index.
    """
    return bind(config, params).call_with_cache(tokens, positions, cache, segment_ids)
