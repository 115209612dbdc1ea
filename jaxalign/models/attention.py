"""Attention kernels behind one call: ``attend(q, k, v, mask, scale=..., implementation=...)``.

``softmax(s q.k^T + mask) v`` with grouped-query heads (query head n reads key/value head
``n // (N / K)``), the logits and softmax in float32, and a boolean ``mask [B, 1, T, S]`` (causal,
same packed segment, sliding window: ``transformer.attention_mask`` builds it). Implementations
(``ModelConfig.attention``):

- ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")``, the reference; it
  materialises the ``[B, N, T, S]`` scores.
- ``"cudnn"``: the same call with ``implementation="cudnn"``, cuDNN's fused (flash) attention
  (Dao et al., "FlashAttention", 2022) on NVIDIA GPUs: the scores stay on chip; the boolean mask
  becomes an additive ``[B, 1, T, S]`` bias, one per row and not per head, so packing, causal
  masking and per-layer sliding windows (data in the scanned layer stack) all take this path.
- ``"auto"``: ``"cudnn"`` on a GPU backend, ``"xla"`` elsewhere. TPU has no flash kernel here yet
  (the Pallas splash kernel is not wired in), so TPU runs the XLA path.

Decoding with a KV cache (one query per step against S cache slots) always runs the XLA path.
"""

from __future__ import annotations

import jax
from jaxtyping import Array, Bool, Float

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
_AUTO = {"gpu": "cudnn", "cuda": "cudnn"}


def resolve(implementation: str) -> str:
    """The implementation ``"auto"`` stands for on the default backend, else ``implementation``;
    ``"cudnn"`` off a GPU backend raises ValueError."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {implementation!r}; expected one of "
            f"{ATTENTION_IMPLEMENTATIONS}"
        )
    backend = jax.default_backend()
    if implementation == "auto":
        return _AUTO.get(backend, "xla")
    if implementation == "cudnn" and backend not in _AUTO:
        raise ValueError(
            f'attention="cudnn" needs a GPU backend but the default backend is {backend!r}; '
            'use "auto" or "xla"'
        )
    return implementation


def attend(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    mask: Bool[Array, "B 1 T S"],
    *,
    scale: float | None,
    implementation: str = "auto",
) -> Float[Array, "B T N H"]:
    """``softmax(scale q.k^T where mask) v`` per head (``scale`` None: ``H ** -0.5``), by
    ``implementation`` (see the module docstring). Every row of ``mask`` must keep one key."""
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, implementation=resolve(implementation)
    )
