"""KL-penalty coefficient controllers: fixed, and the adaptive controller of Ziegler et al.
(2019, "Fine-tuning language models from human preferences"), as TRL and verl.

The static parameters (kind, target, horizon) are a frozen, hashable ``KLController`` (close
over it in a jitted step); the coefficient, which changes, is a plain dict of float32 arrays
``{"coef": f32[]}`` that goes into the checkpoint. ``update_kl_controller`` is pure and jittable.

    controller, state = init_kl_controller("adaptive", coef=0.05, target=6.0, horizon=10_000)
    token_rewards = kl_shaped_rewards(rewards, kl, mask, kl_coef=kl_coef(state))  # advantages.py
    state = update_kl_controller(controller, state, observed_kl, n_steps=B)  # after the step

``observed_kl`` and ``target`` must be in the same unit: Ziegler et al. and TRL's PPO use the KL
per completion (sum over its tokens, mean over completions; target 6 nats, horizon 10000), verl
the per-token mean; the loop that calls this says which it passes. ``n_steps`` is the number of
samples (completions) the step used.
"""

import dataclasses

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from jaxalign.errors import ConfigError

KINDS = ("fixed", "adaptive")

KLState = dict[str, Float[Array, ""]]


@dataclasses.dataclass(frozen=True)
class KLController:
    """Static parameters of a KL controller (from the config; not checkpointed)."""

    kind: str = "fixed"
    target: float | None = None
    horizon: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f'KL controller kind "{self.kind}" is not one of {", ".join(KINDS)}')
        if self.kind == "fixed":
            if self.target is not None or self.horizon is not None:
                raise ConfigError(
                    "a fixed KL controller takes no target or horizon (they only apply to "
                    f'kind "adaptive"); got target={self.target}, horizon={self.horizon}'
                )
            return
        for name in ("target", "horizon"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ConfigError(
                    f"the adaptive KL controller needs {name} > 0 (a number), got {value!r}"
                )


def init_kl_controller(
    kind: str = "fixed",
    *,
    coef: float,
    target: float | None = None,
    horizon: float | None = None,
) -> tuple[KLController, KLState]:
    """``(controller, state)``: the static ``KLController`` and the state ``{"coef": coef}``.

    ``kind`` "fixed" (coef never changes) or "adaptive" (needs ``target`` > 0 and ``horizon``
    > 0). ``coef`` >= 0. Bad values raise ``ConfigError``.
    """
    controller = KLController(kind, target, horizon)
    if not isinstance(coef, int | float) or isinstance(coef, bool) or not coef >= 0:
        raise ConfigError(f"the KL coefficient must be a number >= 0, got {coef!r}")
    return controller, {"coef": jnp.asarray(coef, jnp.float32)}


def kl_coef(state: KLState) -> Float[Array, ""]:
    """The current KL coefficient (float32 scalar)."""
    return state["coef"]


def update_kl_controller(
    controller: KLController,
    state: KLState,
    observed_kl: Float[ArrayLike, ""],
    n_steps: Float[ArrayLike, ""],
) -> KLState:
    """The next state after a step that observed ``observed_kl`` over ``n_steps`` samples.

    fixed: unchanged. adaptive (Ziegler et al., 2019, eq. 2):
    e = clip(KL / target - 1, -0.2, 0.2),   coef <- coef (1 + e n_steps / horizon).
    """
    if controller.kind == "fixed":
        return state
    error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / controller.target - 1.0, -0.2, 0.2)
    factor = 1.0 + error * jnp.asarray(n_steps, jnp.float32) / controller.horizon
    return {"coef": state["coef"] * factor}
