"""Rotary position embeddings (RoPE) in the Hugging Face "rotate_half" convention.

RoPE (Su et al., "RoFormer", 2021) rotates each pair ``(x[i], x[i + H/2])`` of a query/key head by
the angle ``position * inv_freq[i]`` with ``inv_freq[i] = theta ** (-2i / H)``. Pairing the first
half of the head with the second half (rather than interleaved pairs) is the layout of the Hugging
Face Llama checkpoints, so their q/k weights load without a permutation.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxalign.models.config import ModelConfig, RopeScaling, local_layers


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies ``[H/2]`` (float64, computed once at trace time).

    With "linear" ``scaling``: ``f' = f / factor``. With "llama3" ``scaling`` (Llama 3.1): for
    wavelength ``w = 2 pi / f``, ``lo = orig / low_freq_factor``, ``hi = orig / high_freq_factor``:
    ``f' = f / factor`` if ``w > lo``; ``f' = f`` if ``w < hi``; otherwise
    ``f' = (1 - s) f / factor + s f`` with ``s = (orig / w - low) / (high - low)``.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    orig = scaling.original_max_position_embeddings
    low_wavelen = orig / scaling.low_freq_factor
    high_wavelen = orig / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, interpolated, scaled)


def layer_inv_freq(config: ModelConfig) -> np.ndarray:
    """``[L, H/2]`` inverse frequencies of each layer: local (sliding-window) layers use
    ``rope_local_theta`` unscaled when it is set, every other layer ``rope_theta`` with
    ``rope_scaling``. Data, not code: the layer scan reads row i in layer i."""
    global_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    if config.rope_local_theta is None:
        local_freq = global_freq
    else:
        local_freq = rope_inv_freq(config.head_dim, config.rope_local_theta)
    return np.where(local_layers(config)[:, None], local_freq, global_freq)


def apply_rope(
    x: Float[Array, "B T N H"], positions: Int[Array, "B T"], inv_freq: Float[Array, " H2"]
) -> Float[Array, "B T N H"]:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half([a, b]) = [-b, a]``, computed in at
    least float32."""
    compute = jnp.promote_types(x.dtype, jnp.float32)
    angles = positions.astype(compute)[..., None] * jnp.asarray(inv_freq, compute)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    xf = x.astype(compute)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)
