"""Preference distillation losses on token log-probs (METHODS.md section 10).

ADPA (Gao et al., 2025, "Advantage-Guided Distillation for Preference Alignment in Small Language
Models"): a small student learns from a large DPO-aligned teacher T and that teacher's own
reference T_ref. Not in the loss registry: it reads four models' per-token log-probs, which only
the `adpa` trainer family supplies (`jaxalign.train.distill.adpa_objective`).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

Metrics = dict[str, Array]
RT = Float[Array, "R T"]
P = Float[Array, "P"]


def adpa(
    policy_logps: RT,
    ref_logps: RT,
    teacher_logps: RT,
    teacher_ref_logps: RT,
    mask: RT,
    seq_index: Int[Array, "R T"],
    *,
    num_pairs: int,
    num_groups: int = 1,
    beta: float = 0.1,
    alpha: float = 1.0,
) -> tuple[P, Metrics]:
    """ADPA on pair data: DPO on the student plus a token-level regression of the student's
    per-token log-ratio onto the teacher's advantage, on the chosen and the rejected tokens.

        r_t = log pi(y_t) - log pi_ref(y_t)              (student, y_t the data's token)
        A_t = log p_T(y_t) - log p_Tref(y_t)             (teacher's advantage, no gradient)
        D   = sum_{t in y_w} r_t - sum_{t in y_l} r_t
        loss_i = -logsig(beta D) + alpha sum_{t in y_w u y_l} (r_t - A_t)^2 / |y_w u y_l|.

    Gao et al. 2025 use the teacher's advantage A(s_t, a) = log pi_T(a|s_t) - log pi_Tref(a|s_t)
    as a distribution-level reward over the whole vocabulary; the published objective is
    unverified here. jaxalign's documented choice: the advantage of the data's own tokens only
    (per-token log-probs, never [B, T, V] logits), matched by the student's log-ratio in squared
    error (bounded, zero when the student's alignment shift equals the teacher's token by token),
    averaged over the pair's counted tokens, added to the student's DPO loss with weight alpha;
    alpha = 0 is plain DPO.

    Inputs are per-token [R, T] arrays of a pair batch (0 on uncounted tokens), `seq_index` the
    global sequence of each token (`jaxalign.train.objectives.sequence_index`: 2 num_pairs on
    padding); block g of `num_groups` holds its P chosen then its P rejected sequences.
    Returns the loss per pair [num_pairs] and per-pair metrics: `adpa/dpo`,
    `adpa/advantage_mse`, `adpa/teacher_margin` (A summed over y_w minus over y_l) and
    `rewards/accuracy` (D > 0).
    """
    total = 2 * num_pairs

    def per_sequence(values):  # [R, T] -> [2P] sums, padding dropped
        return jax.ops.segment_sum((values * mask).ravel(), seq_index.ravel(), total + 1)[:total]

    def pairs(x):  # [G * 2P'] -> chosen [P], rejected [P]
        x = x.reshape(num_groups, 2, -1)
        return x[:, 0].reshape(-1), x[:, 1].reshape(-1)

    advantage = jax.lax.stop_gradient(teacher_logps - teacher_ref_logps)
    ratio = policy_logps - ref_logps
    chosen, rejected = pairs(per_sequence(ratio))
    margin = chosen - rejected
    dpo_loss = -jax.nn.log_sigmoid(beta * margin)
    sq_w, sq_l = pairs(per_sequence((ratio - advantage) ** 2))
    n_w, n_l = pairs(per_sequence(jnp.ones_like(mask)))
    mse = (sq_w + sq_l) / jnp.maximum(n_w + n_l, 1.0)
    a_w, a_l = pairs(per_sequence(advantage))
    metrics = {
        "adpa/dpo": jax.lax.stop_gradient(dpo_loss),
        "adpa/advantage_mse": jax.lax.stop_gradient(mse),
        "adpa/teacher_margin": a_w - a_l,
        "rewards/accuracy": (margin > 0).astype(jnp.float32),
    }
    return dpo_loss + alpha * mse, metrics
