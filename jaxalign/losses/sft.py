"""Supervised fine-tuning losses (METHODS.md section 3): sft, poft."""

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


def poft(policy_logps: B, ref_logps: B, lengths: B) -> tuple[B, dict[str, Array]]:
    """Preference-Oriented Supervised Fine-Tuning (Fan et al., 2024): on SFT data, the policy
    should score the response above an aligned model does.

    loss = -logsig(score_theta(x, y) - score_aligned(x, y)),   score(x, y) = logp(y) / |y|,

    ``ref_logps`` the aligned model's sums over the response tokens (the trainer's reference: run
    with ``reference.soup=("checkpoint:ALIGNED",)``, or their `jaxalign cache-ref` cache, whose
    sums divided by the lengths are the aligned scores), ``lengths`` the float token counts
    (clamped to >= 1). One aligned model and no temperature on the margin (choices: the paper's
    several aligned models are averaged into one reference by ``reference.soup``).
    """
    n = jnp.maximum(lengths, 1.0)
    score = policy_logps / n
    aligned = ref_logps / n
    loss = -jax.nn.log_sigmoid(score - aligned)
    score, aligned = jax.lax.stop_gradient(score), jax.lax.stop_gradient(aligned)
    return loss, {
        "poft/score": score,
        "poft/aligned_score": aligned,
        "poft/margin": score - aligned,
        "poft/accuracy": (score > aligned).astype(jnp.float32),
        "nll": -score,
    }
