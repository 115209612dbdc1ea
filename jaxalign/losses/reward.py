"""Reward-model losses and reward transforms (METHODS.md section 4)."""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

B = Float[Array, "B"]


def bradley_terry(
    chosen_rewards: B,
    rejected_rewards: B,
    margin: B | None = None,
    *,
    center_coef: float = 0.0,
) -> tuple[B, dict[str, Array]]:
    """Bradley-Terry reward-model loss (Ouyang et al., 2022) with the Llama 2 margin (Touvron et
    al., 2023) and reward centering (Eisenstein et al., 2023).

    loss = -logsig(r_w - r_l - margin) + center_coef (r_w + r_l)^2,

    ``margin`` [B] an optional per-pair data field (0 when absent).
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -jax.nn.log_sigmoid(diff) + center_coef * (chosen_rewards + rejected_rewards) ** 2
    chosen = jax.lax.stop_gradient(chosen_rewards)
    rejected = jax.lax.stop_gradient(rejected_rewards)
    return loss, {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracy": (chosen > rejected).astype(jnp.float32),
        "rewards/margin": chosen - rejected,
    }


def genarm_bt(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    *,
    beta: float = 1.0,
) -> tuple[B, dict[str, Array]]:
    """Autoregressive reward model (GenARM; Xu et al., 2024, "GenARM: Reward Guided Generation with
    Autoregressive Reward Model for Test-time Alignment"): the reward is the causal LM's own
    sequence log-likelihood, trained with the Bradley-Terry loss on it (no reference model).

    r(x, y) = sum_t log pi_r(y_t | x, y_<t),   loss = -logsig(beta_r (r(y_w) - r(y_l))),

    ``beta`` is beta_r. Default 1.0 (a choice: the catalog leaves beta_r open); at decoding time
    the trained model guides a base model as p_base p_r^(1 / beta) (`jaxalign.sampling.guided.
    genarm`). Metrics: the rewards beta_r r(y) of each side, their accuracy and margin.
    """
    chosen = jax.lax.stop_gradient(beta * policy_chosen_logps)
    rejected = jax.lax.stop_gradient(beta * policy_rejected_logps)
    loss = -jax.nn.log_sigmoid(beta * (policy_chosen_logps - policy_rejected_logps))
    return loss, {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracy": (chosen > rejected).astype(jnp.float32),
        "rewards/margin": chosen - rejected,
    }


def lsc_transform(
    rewards: Float[Array, "*B"], ref_rewards: Float[Array, "*B"]
) -> Float[Array, "*B"]:
    """Log-sigmoid-centered reward transform (Wang et al., 2024, Transforming and Combining
    Rewards for Aligning LLMs).

    u(x, y) = logsig(r(x, y) - r_ref(x)),

    r_ref(x) a per-prompt reference reward (e.g. the reward of a reference response). u <= 0 and
    saturates for large r: improving an already good response earns little.
    """
    return jax.nn.log_sigmoid(rewards - ref_rewards)


def lsc_combine(rewards: Float[Array, "B K"], ref_rewards: Float[Array, "B K"]) -> B:
    """Combine K rewards as a logical AND (Wang et al., 2024): sum_i logsig(r_i - r_i_ref)."""
    return jnp.sum(lsc_transform(rewards, ref_rewards), axis=-1)


def multi_objective_mse(
    rewards: Float[Array, "B k"], ratings: Float[Array, "B k"]
) -> tuple[B, dict[str, Array]]:
    """Multi-objective reward-model regression (Wang et al., 2024, "Arithmetic Control of LLMs
    for Diverse User Preferences: Directional Preference Alignment with Multi-Objective Rewards").

    loss = (1/k) sum_j (r_j(x, y) - s_j)^2,

    r(x, y) [k] the reward head's outputs, s [k] the record's ratings (e.g. helpfulness,
    verbosity). The paper regresses the k ratings with a squared error and leaves the scale open;
    jaxalign averages over the k objectives, so the loss does not grow with k. Metrics: the
    per-example squared error of each objective (`rewards/mse_<j>`) and the mean absolute error
    (`rewards/mae`).
    """
    err = rewards - ratings
    loss = jnp.mean(err**2, axis=-1)
    sq = jax.lax.stop_gradient(err**2)
    metrics = {f"rewards/mse_{j}": sq[:, j] for j in range(err.shape[-1])}
    metrics["rewards/mae"] = jax.lax.stop_gradient(jnp.mean(jnp.abs(err), axis=-1))
    return loss, metrics


def directional_reward(
    rewards: Float[Array, "*B k"], direction: Float[Array, " k"]
) -> Float[Array, "*B"]:
    """Directional preference (Wang et al., 2024): the user's direction v (a unit vector in the
    space of the k objectives) turns the multi-objective reward into the scalar r_v = v . r(x, y).
    `direction` must already be unit length (`unit_direction`)."""
    return rewards @ direction


def unit_direction(direction) -> tuple[float, ...]:
    """v / |v| for a user's direction (a list of k numbers); ValueError if it is empty, zero or
    not finite."""
    v = np.asarray(direction, np.float64)
    if v.ndim != 1 or v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError(
            f"direction {tuple(direction)!r} is not a non-empty list of finite numbers"
        )
    norm = float(np.linalg.norm(v))
    if norm == 0.0:
        raise ValueError(f"direction {tuple(direction)!r} is zero: it points nowhere")
    return tuple(float(x) for x in v / norm)
