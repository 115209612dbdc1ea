"""Supervised fine-tuning loss (METHODS.md section 3)."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

B = Float[Array, "B"]


def sft(policy_logps: B, lengths: B) -> tuple[B, dict[str, Array]]:
    """Token-mean negative log-likelihood of the response (prompt tokens masked upstream).

    loss_i = -logp(y_i) / |y_i|,

    ``policy_logps`` the sums over response tokens, ``lengths`` the float token counts (clamped
    to >= 1). The per-example mean weighs every sequence equally; for the token-weighted mean of
    a packed batch, sum_i -logp(y_i) / sum_i |y_i|, the trainer weights example i by
    |y_i| / sum_j |y_j|. Both agree when all lengths are equal.
    """
    nll = -policy_logps / jnp.maximum(lengths, 1.0)
    return nll, {"nll": jax.lax.stop_gradient(nll)}
