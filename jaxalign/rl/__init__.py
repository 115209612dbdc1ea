"""Online RL pieces that are not a training loop: advantages (GAE, GRPO, RLOO, REINFORCE++),
rewards (rule rewards, scaling, transforms) and the KL controller. Policy losses live in
``jaxalign.losses.policy``."""

from jaxalign.rl import advantages, kl_control, rewards

__all__ = ["advantages", "kl_control", "rewards"]
