"""GRAO's pairwise term over the groups of an online rollout (Wang et al., 2025, "Learning to
Align, Aligning to Learn: A Unified Approach for Self-Optimized Alignment"; METHODS.md section 5:
"advantage-weighted imitation + exploration + pairwise term", published form unverified).

jaxalign's GRAO (the documented choice) is GRPO's clipped, advantage-weighted log-likelihood of
the G sampled responses of a prompt (imitation of those above the group mean, A_i > 0, and
exploration away from those below, A_i < 0; `jaxalign.losses.policy.clipped_policy_loss`) plus
``rl.pair_coef`` times a pairwise Bradley-Terry term inside each group:

    l_i = logp(o_i) / |o_i|   (length-normalised log-likelihood at the sampling temperature),
    P_g = {(i, j) in group g : A_i > A_j},
    pair(g) = 1/|P_g| sum_{(i, j) in P_g} -log sigmoid(beta (l_i - l_j))   (0 when P_g is empty)

and the loss adds pair_coef * mean_g pair(g). The pairs come from the group advantages (the same
order as the rewards); the term is reference-free (SimPO-like length-normalised scores). The
paper's imitation of a *data* response is not built: the online loop's prompt batches carry no
reference answer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

Rows = Float[Array, " R"]


def grao_pairwise(
    scores: Rows,
    advantages: Rows,
    row_mask: Rows,
    *,
    group_size: int,
    beta: float = 1.0,
) -> tuple[Rows, dict[str, Rows]]:
    """Per-row share of GRAO's pairwise term (module docstring) for R rows in contiguous groups
    of ``group_size`` G: row i of group g gets G/2 * (the pair losses it takes part in) / |P_g|,
    so the mean over a group's rows is pair(g) and the mean over all rows is mean_g pair(g).

    ``scores`` l_i, ``advantages`` A_i, ``row_mask`` 1 for real rows (0 rows join no pair).
    Metrics per row (the group's value): "grao/pair_loss" pair(g), "grao/pair_accuracy" the
    fraction of P_g with l_i > l_j, "grao/pairs" |P_g|."""
    G = group_size
    s, a, m = (x.reshape(-1, G) for x in (scores, advantages, row_mask))
    valid = (m[:, :, None] > 0) & (m[:, None, :] > 0)
    pairs = (valid & (a[:, :, None] > a[:, None, :])).astype(jnp.float32)  # [g, i, j]: i over j
    margin = s[:, :, None] - s[:, None, :]
    losses = -jax.nn.log_sigmoid(beta * margin) * pairs
    count = pairs.sum((1, 2))
    per_pair = 1.0 / jnp.maximum(count, 1.0)
    share = 0.5 * G * (losses.sum(2) + losses.sum(1)) * per_pair[:, None]
    group = losses.sum((1, 2)) * per_pair
    accuracy = ((margin > 0) * pairs).sum((1, 2)) * per_pair

    def rows(x):
        return jnp.repeat(x, G)

    metrics = {
        "grao/pair_loss": rows(group),
        "grao/pair_accuracy": rows(accuracy),
        "grao/pairs": rows(count),
    }
    return share.reshape(-1), metrics
