"""Generalised Jensen-Shannon divergence between a student's and a teacher's next-token
distributions over the full vocabulary, per token (GKD; Agarwal et al., 2024, "On-Policy
Distillation of Language Models").

Implementations (``implementation=``): ``reference`` (two full logits tensors; the spec) and
``xla`` (vocab-blocked, two passes, ``custom_vjp``; never ``[N, V]``). ``None`` picks ``xla``
on every backend (there is no Pallas kernel for this op yet).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxalign.kernels import _dispatch

IMPLEMENTATIONS = ("reference", "xla")


def token_jsd(
    hidden_s: Float[Array, "*B Ds"],
    unembedding_s: Float[Array, "Ds V"],
    hidden_t: Float[Array, "*B Dt"],
    unembedding_t: Float[Array, "Dt V"],
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Array | None = None,
    implementation: str | None = None,
    block_size: int | None = None,
) -> Float[Array, "*B"]:
    """Per-token generalised JSD between the student S and the teacher T, float32:

        JSD_b(p_T, p_S) = b KL(p_T || m) + (1 - b) KL(p_S || m),   m = b p_T + (1 - b) p_S,

    ``p_S = softmax(h_S @ W_S / temperature)``, ``p_T = softmax(h_T @ W_T / temperature)``.
    At the end points the op returns the limits of the normalised divergence, as TRL's
    ``GKDTrainer.generalized_jsd_loss`` does: ``beta=0`` the forward KL(p_T || p_S) (the limit
    of JSD_b / b), ``beta=1`` the reverse KL(p_S || p_T) (of JSD_b / (1 - b)); in between the
    plain JSD_b, which lies in [0, H(b)] (H the binary entropy) and is symmetric under
    (b, S, T) -> (1 - b, T, S).

    Gradients flow to the student (``hidden_s``, ``unembedding_s``) only; the teacher is a
    constant. Masked positions (``mask`` 0/False) return 0 with zero gradient. The widths Ds, Dt
    may differ; V must match. ``block_size`` is the vocab tile of ``xla``.
    """
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"jaxalign: token_jsd has no implementation {implementation!r}; expected one of "
            f"{IMPLEMENTATIONS} or None"
        )
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jaxalign: token_jsd beta={beta}: expected 0 <= beta <= 1")
    if temperature <= 0.0:
        raise ValueError(f"jaxalign: token_jsd temperature={temperature}: expected > 0")
    if unembedding_s.shape[1] != unembedding_t.shape[1]:
        raise ValueError(
            f"jaxalign: unembedding_s {unembedding_s.shape} and unembedding_t "
            f"{unembedding_t.shape} must share V"
        )
    if hidden_s.shape[:-1] != hidden_t.shape[:-1]:
        raise ValueError(
            f"jaxalign: hidden_s {hidden_s.shape} and hidden_t {hidden_t.shape} must share the "
            "leading (token) shape"
        )
    module = _dispatch.resolve(__name__, implementation or "xla", False)
    lead = hidden_s.shape[:-1]
    hs = hidden_s.reshape(-1, hidden_s.shape[-1])
    ht = jax.lax.stop_gradient(hidden_t.reshape(-1, hidden_t.shape[-1]))
    wt = jax.lax.stop_gradient(unembedding_t)
    if temperature != 1.0:  # z / tau = (h / tau) @ W on both sides
        hs = hs / jnp.asarray(temperature, hs.dtype)
        ht = ht / jnp.asarray(temperature, ht.dtype)
    if mask is not None:
        if mask.shape != lead:
            raise ValueError(f"jaxalign: mask has shape {mask.shape}, expected {lead}")
        m = jnp.asarray(mask).reshape(-1).astype(bool)
        hs = jnp.where(m[:, None], hs, jnp.zeros((), hs.dtype))
        ht = jnp.where(m[:, None], ht, jnp.zeros((), ht.dtype))
    out = module.jsd(hs, unembedding_s, ht, wt, beta=beta, block_size=block_size)
    if mask is not None:
        out = jnp.where(m, out, 0.0)
    return out.reshape(lead)


__all__ = ["token_jsd"]
