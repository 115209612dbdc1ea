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

Self-alignment (I-SHEEP, Liang et al., 2024, "I-SHEEP: Self-Alignment of LLM from Scratch
through an Iterative Self-Enhancement Paradigm"): the model answers, judges its own answers,
keeps the good ones and is fine-tuned on them, round after round. I-SHEEP's judge is the model
prompted to grade its answer; jaxalign's self-contained judge needs no judging prompt (a tiny
model cannot follow one): the answer's length-normalised log-prob under the model itself,

    j(y) = (1 / L) sum_t log pi(y_t | x, y_<t)      (L = the completion's tokens, EOS included),

the log of the geometric-mean token probability: how sure the model is of its own answer
(`rl.rft_self_judge="confidence"`), or the share of its own G samples that give the same answer,

    c(y_i) = (1 / G) sum_j [y_j = y_i]      (equal completion tokens, EOS included),

self-consistency (Wang et al., 2023, "Self-Consistency Improves Chain of Thought Reasoning";
majority votes as self-training labels: Huang et al., 2023, "Large Language Models Can
Self-Improve"; `rl.rft_self_judge="consistency"`). Per prompt the best-judged of G samples is kept
when its judgment >= `min_score` (`self_judged_best`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int


def self_judge_scores(
    token_logps: Float[ArrayLike, "R T"], loss_mask: Float[ArrayLike, "R T"]
) -> Float[Array, " R"]:
    """I-SHEEP-style self-judgment of R completions: j = sum_t m_t logp_t / max(sum_t m_t, 1),
    the mean log-prob of each completion's tokens (`loss_mask` m marks them; 0 for none)."""
    m = jnp.asarray(loss_mask, jnp.float32)
    total = (jnp.asarray(token_logps) * m).sum(axis=1)
    return total / jnp.maximum(m.sum(axis=1), 1.0)


def self_consistency_scores(completions: Sequence[Sequence[int]], group_size: int) -> np.ndarray:
    """Self-consistency of R = B x G completions (token ids, consecutive groups of `group_size`
    samples of one prompt): c_i = the fraction of its group whose completion equals completion i
    (itself included, so c_i >= 1 / G), float32 [R]."""
    if len(completions) % group_size:
        raise ValueError(f"{len(completions)} completions do not split into groups of {group_size}")
    keys = [tuple(int(t) for t in c) for c in completions]
    scores = np.empty(len(keys), np.float32)
    for start in range(0, len(keys), group_size):
        counts = Counter(keys[start : start + group_size])
        for i in range(start, start + group_size):
            scores[i] = counts[keys[i]] / group_size
    return scores


def self_judged_best(scores: Float[ArrayLike, "B G"], *, min_score: float) -> dict[str, Array]:
    """Per prompt, the best self-judged of its G samples: {"best" [B] int (the first of equal
    scores wins), "score" [B] its judgment, "keep" [B] bool = score >= min_score}."""
    s = jnp.asarray(scores)
    best: Int[Array, " B"] = jnp.argmax(s, axis=1)
    score = s[jnp.arange(s.shape[0]), best]
    keep: Bool[Array, " B"] = score >= min_score
    return {"best": best, "score": score, "keep": keep}


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
