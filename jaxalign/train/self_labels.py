"""Preference labels a model gives its own samples.

SPA (Kim et al., 2024, "Spread Preference Annotation: Direct Preference Judgment for Efficient
LLM Alignment"): the policy's implicit DPO reward s(y) = log pi(y|x) - log pi_ref(y|x) ranks its
samples of a prompt; the preference probability of the pair is

    p = sigmoid(beta * (s(y_1) - s(y_2)))

and only confident pairs are trained on. SPA's paper refines labels by confidence; jaxalign
keeps the pair when its confidence |p - 0.5| exceeds `min_confidence` (a per-pair threshold,
so a pair's fate does not depend on the rest of its batch) and trains DPO on it unchanged.
With G > 2 samples per prompt the pair is (argmax s, argmin s), p taken between them (the
first of equal rewards wins, as `jaxalign.train.updates.pair_batch`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int


def spa_labels(
    policy_logps: Float[ArrayLike, "B G"],
    ref_logps: Float[ArrayLike, "B G"],
    *,
    beta: float,
    min_confidence: float,
) -> dict[str, Array]:
    """SPA's self-annotation of B prompts' G samples (sequence log-probs under the policy and the
    reference): {"chosen" [B] int, "rejected" [B] int (sample indices), "prob" [B] =
    sigmoid(beta (s_chosen - s_rejected)) (>= 0.5), "confidence" [B] = prob - 0.5, "keep" [B]
    bool = confidence > min_confidence}, s = policy_logps - ref_logps."""
    s = jnp.asarray(policy_logps) - jnp.asarray(ref_logps)
    chosen: Int[Array, " B"] = jnp.argmax(s, axis=1)
    rejected: Int[Array, " B"] = jnp.argmin(s, axis=1)
    rows = jnp.arange(s.shape[0])
    prob = jax.nn.sigmoid(beta * (s[rows, chosen] - s[rows, rejected]))
    confidence = prob - 0.5
    keep: Bool[Array, " B"] = confidence > min_confidence
    return {
        "chosen": chosen,
        "rejected": rejected,
        "prob": prob,
        "confidence": confidence,
        "keep": keep,
    }
