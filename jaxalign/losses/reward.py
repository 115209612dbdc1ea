"""Reward-model losses and reward transforms (METHODS.md section 4)."""

import jax
import jax.numpy as jnp
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
