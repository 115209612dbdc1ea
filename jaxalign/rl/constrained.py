"""Safety-constrained RLHF with a high-confidence safety test: HC-RLHF (Chittepu et al., 2025,
"Reinforcement Learning from Human Feedback with High-Confidence Safety Constraints").

The policy maximises the reward subject to its expected cost staying at or below tau, with a
reward model (or rule rewards) and a cost model (or rule costs, `jaxalign.rl.rewards` syntax):

    max_theta E[r]   subject to   E[c] <= tau.

Candidate selection (training) runs Lagrangian RLOO: each completion's reward becomes
r - lambda c (`lagrangian_rewards`), then the rloo family's leave-one-out advantage within the
prompt's group; the multiplier lambda >= 0 follows projected gradient ascent driven by a
*pessimistic* upper bound on the cost (`pessimistic_bound`, `update_multiplier`), inflated so
that the later safety test is likely to pass. After training, the safety test
(`safety_test`) samples n fresh completions on held-out prompts: the one-sided Student-t upper
confidence bound on the mean cost must be <= tau, else the result is "no solution" (not to be
deployed).

Student-t quantiles come from `scipy.stats.t.ppf` (scipy is a dependency of jax), on the host:
sample sizes are static, so a quantile is a constant of the traced function. Every function is
pure and jittable in its array arguments; standard deviations are sample ones (ddof=1), as in
the t-statistic.
"""

import jax.numpy as jnp
import scipy.stats
from jaxtyping import Array, ArrayLike, Bool, Float

SeqArray = Float[Array, "B"]
SeqLike = Float[ArrayLike, " B"]
Scalar = Float[Array, ""]


def t_quantile(p: float, dof: int) -> float:
    """The p-quantile of Student's t distribution with `dof` degrees of freedom, t_{p, dof}."""
    if not 0 < p < 1 or dof < 1:
        raise ValueError(f"jaxalign: t_quantile needs 0 < p < 1 and dof >= 1, got p={p}, dof={dof}")
    return float(scipy.stats.t.ppf(p, dof))


def _mean_std(costs: SeqLike) -> tuple[Scalar, Scalar, int]:
    """(mean, sample std, B) of costs [B], B >= 2."""
    c = jnp.asarray(costs, jnp.float32)
    if c.ndim != 1 or c.shape[0] < 2:
        raise ValueError(f"jaxalign: expected costs [B] with B >= 2, got shape {c.shape}")
    return jnp.mean(c), jnp.std(c, ddof=1), c.shape[0]


def pessimistic_bound(
    costs: SeqLike,
    *,
    n_safety: int,
    delta: float = 0.1,
    c1: float = 4.0,
    c2: float = 2.0,
    tau: float = 0.0,
) -> Scalar:
    """HC-RLHF's pessimistic cost bound of a candidate batch (Chittepu et al., 2025):

    g = mean(c) + (C1 t_{1-d, nb-1} / sqrt(nb) + C2 t_{1-d, ns-1} / sqrt(ns)) std(c) - tau,

    nb = len(costs) the candidate batch, ns = `n_safety` the safety test's sample size, std with
    ddof=1. g <= 0 predicts that the safety test passes. The C1 term is the uncertainty of the
    batch's own estimate, the C2 term the width the safety test will add; C1 = 4, C2 = 2
    inflate both, so candidate selection aims below tau (Thomas et al., 2019, double the
    safety-test width).
    """
    mean, std, nb = _mean_std(costs)
    width = c1 * t_quantile(1 - delta, nb - 1) / nb**0.5
    width += c2 * t_quantile(1 - delta, n_safety - 1) / n_safety**0.5
    return mean + width * std - tau


def safety_test(
    costs: SeqLike, *, tau: float = 0.0, delta: float = 0.1
) -> tuple[Bool[Array, ""], Scalar]:
    """HC-RLHF's safety test on n held-out costs: (passed, ucb),

    ucb = mean(c) + t_{1-d, n-1} std(c) / sqrt(n),  passed = ucb <= tau,

    the one-sided (1 - d) Student-t upper confidence bound on the mean cost (std with ddof=1).
    A failed test returns "no solution": the trained policy must not be deployed.
    """
    mean, std, n = _mean_std(costs)
    ucb = mean + t_quantile(1 - delta, n - 1) * std / n**0.5
    return ucb <= tau, ucb


def lagrangian_rewards(rewards: SeqLike, costs: SeqLike, lam: Float[ArrayLike, ""]) -> SeqArray:
    """The Lagrangian reward r - lambda c of each completion.

    With the rloo family's leave-one-out baseline (G completions per prompt, groups contiguous)
    the advantage is linear in it:

    A_i = (r_i - lambda c_i) - mean_{j != i, same prompt} (r_j - lambda c_j)
        = RLOO(r)_i - lambda RLOO(c)_i.

    jaxalign's choice: the policy gradient sees the cost itself (the bound's mean term); the
    bound's std term moves the multiplier only (`update_multiplier`), not the policy.
    """
    return jnp.asarray(rewards, jnp.float32) - lam * jnp.asarray(costs, jnp.float32)


def update_multiplier(
    lam: Float[ArrayLike, ""], bound: Float[ArrayLike, ""], *, lr: float
) -> Scalar:
    """Projected gradient ascent on the multiplier of L(theta, lambda) = E[r] - lambda g:

    lambda' = max(0, lambda + lr g),

    g the pessimistic bound (`pessimistic_bound`): lambda grows while the bound is violated
    (g > 0) and shrinks towards 0 once it holds.
    """
    return jnp.maximum(0.0, jnp.asarray(lam, jnp.float32) + lr * bound)
