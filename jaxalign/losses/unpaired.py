"""Unpaired and negative-only losses (METHODS.md section 2): kto, bco, npo, d2o.

Inputs are per-response sequence log-probs ``policy_logps`` and ``ref_logps`` [B] (sums over
response tokens), ``s = policy_logps - ref_logps``; ``labels`` [B] is 1 for a desirable response
and 0 for an undesirable one.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

Metrics = dict[str, Array]
B = Float[Array, "B"]


def _masked_mean(x: B, mask: B | None) -> Float[Array, ""]:
    if mask is None:
        return jnp.mean(x)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def kto(
    policy_logps: B,
    ref_logps: B,
    labels: B,
    kl_policy_logps: B,
    kl_ref_logps: B,
    example_mask: B | None = None,
    *,
    beta: float = 0.1,
    lam_d: float = 1.0,
    lam_u: float = 1.0,
) -> tuple[B, Metrics]:
    """Kahneman-Tversky Optimization (Ethayarajh et al., 2024).

    desirable:   lam_d (1 - sig(beta (s - z0)))
    undesirable: lam_u (1 - sig(beta (z0 - s)))
    z0 = stop_gradient(max(0, mean_B(kl_policy_logps - kl_ref_logps)))

    ``kl_*_logps`` [B] are log-probs of mismatched (prompt, completion) pairs (completion i under
    the prompt of another example), the paper's batch-level KL estimate. The mean runs over the
    (global) batch, restricted to ``example_mask`` when given so padding rows do not shift z0.
    """
    s = policy_logps - ref_logps
    kl = _masked_mean(kl_policy_logps - kl_ref_logps, example_mask)
    z0 = jax.lax.stop_gradient(jnp.maximum(kl, 0.0))
    desirable = jnp.asarray(labels) > 0.5
    loss = jnp.where(
        desirable,
        lam_d * (1.0 - jax.nn.sigmoid(beta * (s - z0))),
        lam_u * (1.0 - jax.nn.sigmoid(beta * (z0 - s))),
    )
    metrics = {
        "rewards/reward": jax.lax.stop_gradient(beta * s),
        "rewards/accuracy": jnp.where(desirable, s > z0, s < z0).astype(jnp.float32),
        "kl": z0,
    }
    return loss, metrics


def bco(
    policy_logps: B,
    ref_logps: B,
    labels: B,
    delta: Float[Array, ""] | float = 0.0,
    density_ratio: B | None = None,
    *,
    beta: float = 0.1,
) -> tuple[B, Metrics]:
    """Binary Classifier Optimization, unpaired (Jung et al., 2024).

    desirable:   -logsig(beta s - delta)
    undesirable: -w(x) logsig(-(beta s - delta)),   w(x) = clip(density_ratio, 0.5, 10), else 1

    ``delta`` is the running mean of the rewards beta * s over all responses seen so far, carried
    by the trainer, which updates it from the masked batch mean of
    ``metrics["delta/batch_reward"]`` (= beta * s, stop-gradient). ``density_ratio`` is the
    paper's optional underlying-distribution-matching weight.
    """
    reward = beta * (policy_logps - ref_logps)
    desirable = jnp.asarray(labels) > 0.5
    weight = 1.0 if density_ratio is None else jnp.clip(density_ratio, 0.5, 10.0)
    loss = jnp.where(
        desirable,
        -jax.nn.log_sigmoid(reward - delta),
        -weight * jax.nn.log_sigmoid(-(reward - delta)),
    )
    reward = jax.lax.stop_gradient(reward)
    metrics = {
        "rewards/reward": reward,
        "rewards/accuracy": jnp.where(desirable, reward > delta, reward < delta).astype(
            jnp.float32
        ),
        "delta/batch_reward": reward,
    }
    return loss, metrics


def npo(
    policy_logps: B,
    ref_logps: B,
    *,
    beta: float = 0.1,
) -> tuple[B, Metrics]:
    """Negative Preference Optimization for unlearning (Zhang et al., 2024), forget-set responses.

    loss = -(2 / beta) logsig(-beta s(y)).

    Retain-set variants are loss mixes; NPO+GD with retain sums passed as extra inputs:
    ``mix([("npo", 1.0), ("sft", w, {}, {"policy_logps": "retain_logps",
    "lengths": "retain_lengths"})])``.
    """
    s = policy_logps - ref_logps
    loss = -(2.0 / beta) * jax.nn.log_sigmoid(-beta * s)
    return loss, {"rewards/reward": jax.lax.stop_gradient(beta * s)}


def d2o(
    policy_rejected_logps: B,
    ref_rejected_logps: B,
    policy_samples_logps: Float[Array, "B K"],
    ref_samples_logps: Float[Array, "B K"],
    *,
    beta: float = 0.1,
    alpha: float = 0.1,
) -> tuple[B, Metrics]:
    """Distributional Dispreference Optimization (Duan et al., 2024, "Negating Negatives:
    Alignment with Human Negative Samples via Distributional Dispreference Optimization").

    loss = -logsig((beta / K) sum_i [logp(y_i) - ref_minus(y_i)]
                   - alpha [logp(y_l) - ref_plus(y_l)]),

    y_l the human negative, y_1..y_K self-generated responses (the K columns of
    ``*_samples_logps``).
    Choices (the catalog marks alpha and K unverified): one frozen reference plays both ref_minus
    and ref_plus; alpha defaults to beta (0.1), so that K = 1 is DPO with the sample as the chosen
    side; K is the data's (``data.num_samples``, default 2).
    """
    samples = jnp.mean(policy_samples_logps - ref_samples_logps, axis=-1)
    rejected = policy_rejected_logps - ref_rejected_logps
    z = beta * samples - alpha * rejected
    loss = -jax.nn.log_sigmoid(z)
    metrics = {
        "rewards/samples": jax.lax.stop_gradient(beta * samples),
        "rewards/rejected": jax.lax.stop_gradient(alpha * rejected),
        "rewards/accuracy": (z > 0).astype(jnp.float32),
        "rewards/margin": jax.lax.stop_gradient(z),
    }
    return loss, metrics
