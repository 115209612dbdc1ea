"""Learning from judgments and constraints (METHODS.md sections 1 and 3): CUT, ASFT, AFT's
constraint ranking and Re-Align's context-contrast term.

Pure functions of log-probs returning ``(loss [B], metrics)``, like every registered loss.
Notation as in `jaxalign.losses.preference`: ``avg(y) = logp(y) / |y|``, ``s(y) = logp(y) -
ref(y)``; lengths are float token counts clamped to >= 1.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxalign.losses.preference import _log1mexp, _safe_len, check_range, paired_metrics

Metrics = dict[str, Array]
B = Float[Array, "B"]
BL = Float[Array, "B L"]
BP = Float[Array, "B P"]
BN = Float[Array, "B N"]

# -log(1 - p) needs p < 1: token log-probs are clamped to at most this before log(1 - exp(.)).
MAX_LOGP = -1e-6


def cut(
    policy_token_logps: BL,
    judged_token_logps: BL,
    response_mask: BL,
    *,
    threshold: float = 1.1,
    unlikelihood_weight: float = 1.0,
) -> tuple[B, Metrics]:
    """Contrastive Unlikelihood Training from judgments (Xu et al., 2023, "Reasons to Reject?
    Aligning Language Models with Judgments").

    Token t of response y is flagged when the judgment j makes it more likely by more than the
    threshold lambda:

        flag_t = p(y_t | x, j, y_<t) / p(y_t | x, y_<t) > lambda     (stop-gradient),
        loss_i = sum_t m_t [flag_t (-w log(1 - p(y_t | x, y_<t))) + (1 - flag_t)(-log p(y_t | x,
                 y_<t))] / |y_i|,

    ``policy_token_logps`` = log p(y_t | x, y_<t) [B, L] (the forward that gets gradients, as in
    the paper: the model is trained without the judgment), ``judged_token_logps`` = log p(y_t |
    x, j, y_<t) on the same response tokens (only compared, never differentiated),
    ``response_mask`` 1 on the response's L token slots that exist. -log(1 - p) is computed as
    -log(1 - exp(min(logp, MAX_LOGP))) (stable at both ends; a token of probability 1 would
    otherwise give an infinite loss). Token-mean per response, like `jaxalign.losses.sft`.
    Metrics: ``cut/flagged`` (fraction of response tokens flagged), ``cut/nll`` (token-mean NLL
    without the judgment).
    """
    check_range("threshold", threshold, 0.0, float("inf"), low_open=True)
    check_range("unlikelihood_weight", unlikelihood_weight, 0.0, float("inf"))
    logp = policy_token_logps
    ratio = jax.lax.stop_gradient(judged_token_logps - logp)
    flagged = (ratio > jnp.log(threshold)).astype(logp.dtype) * response_mask
    unlikely = -unlikelihood_weight * _log1mexp(jnp.minimum(logp, MAX_LOGP))
    per_token = jnp.where(flagged > 0, unlikely, -logp) * response_mask
    lengths = _safe_len(response_mask.sum(-1))
    nll = jax.lax.stop_gradient(-(logp * response_mask).sum(-1) / lengths)
    return per_token.sum(-1) / lengths, {
        "cut/flagged": flagged.sum(-1) / lengths,
        "cut/nll": nll,
    }


def asft(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    chosen_lengths: B,
    rejected_lengths: B,
    *,
    lam: float = 0.1,
) -> tuple[B, Metrics]:
    """Aligned Supervised Fine-Tuning with absolute likelihood (Wang et al., 2024, "ASFT:
    Aligned Supervised Fine-Tuning through Absolute Likelihood"), reference-free.

        loss = NLL(y_w) + lam [-logsig(logodds(y_w)) - logsig(-logodds(y_l))],
        NLL(y_w) = -avg(y_w),   logodds(y) = avg(y) - log(1 - exp(avg(y)))   (ORPO's odds).

    Each response is scored on its own (absolute likelihood), not against the other as in ORPO.
    Since sig(logodds(y)) = exp(avg(y)), the bracket equals -avg(y_w) - log(1 - exp(avg(y_l))):
    it raises the chosen response's mean token probability and lowers the rejected one's. The
    published form's "reconstruction" term is not part of this loss (jaxalign's choice: the
    catalog leaves it unverified; NLL(y_w) above is the supervised term). log(1 - exp(.)) is
    computed stably. Metrics: rewards lam * avg(y) (as ORPO), ``asft/logodds_{chosen,
    rejected}``, ``nll/chosen``.
    """
    avg_chosen = policy_chosen_logps / _safe_len(chosen_lengths)
    avg_rejected = policy_rejected_logps / _safe_len(rejected_lengths)
    odds_chosen = avg_chosen - _log1mexp(avg_chosen)
    odds_rejected = avg_rejected - _log1mexp(avg_rejected)
    align = -jax.nn.log_sigmoid(odds_chosen) - jax.nn.log_sigmoid(-odds_rejected)
    metrics = paired_metrics(lam * avg_chosen, lam * avg_rejected)
    metrics["nll/chosen"] = jax.lax.stop_gradient(-avg_chosen)
    metrics["asft/logodds_chosen"] = jax.lax.stop_gradient(odds_chosen)
    metrics["asft/logodds_rejected"] = jax.lax.stop_gradient(odds_rejected)
    return -avg_chosen + lam * align, metrics


def aft(
    policy_positive_logps: BP,
    policy_negative_logps: BN,
    ref_negative_logps: BN,
    positive_lengths: BP,
    negative_lengths: BN,
    *,
    margin: float = 1.0,
    boundary_weight: float = 1.0,
) -> tuple[B, Metrics]:
    """Alignment Fine-Tuning's constraint ranking (Wang et al., 2024, "Making Large Language
    Models Better Reasoners with Alignment"), over P correct and N incorrect chains per prompt.

        s = avg(y) (the chain's mean token log-prob),
        ranking  = log(1 + sum_{p, n} exp(s_n - s_p)),
        boundary = (1 / N) sum_n max(0, avg_ref(y_n) - margin - s_n),
        loss     = ranking + boundary_weight * boundary.

    The boundary keeps the negatives from collapsing: ranking alone lowers s_n without bound,
    which drags the whole distribution (the paper's motivation for a constraint). Its published
    form is unverified; jaxalign's choice is the hinge above, which lets each negative's mean
    log-prob fall at most ``margin`` nats per token below the reference's and is zero above
    that. The ranking term is log-sum-exp over the P x N score gaps with a 0 logit (stable).
    Metrics: ``aft/ranking``, ``aft/boundary``, ``aft/accuracy`` (fraction of (p, n) with s_p >
    s_n), ``aft/positive`` and ``aft/negative`` (mean s).
    """
    check_range("margin", margin, 0.0, float("inf"))
    check_range("boundary_weight", boundary_weight, 0.0, float("inf"))
    pos = policy_positive_logps / _safe_len(positive_lengths)
    neg = policy_negative_logps / _safe_len(negative_lengths)
    ref_neg = ref_negative_logps / _safe_len(negative_lengths)
    gaps = neg[:, None, :] - pos[:, :, None]  # [B, P, N]: s_n - s_p
    flat = gaps.reshape(gaps.shape[0], -1)
    ranking = jax.nn.logsumexp(jnp.concatenate([jnp.zeros_like(flat[:, :1]), flat], -1), -1)
    boundary = jnp.maximum(0.0, ref_neg - margin - neg).mean(-1)
    stop = jax.lax.stop_gradient
    return ranking + boundary_weight * boundary, {
        "aft/ranking": stop(ranking),
        "aft/boundary": stop(boundary),
        "aft/accuracy": (stop(flat) < 0).astype(flat.dtype).mean(-1),
        "aft/positive": stop(pos.mean(-1)),
        "aft/negative": stop(neg.mean(-1)),
    }


def realign(
    policy_chosen_logps: B,
    policy_contrast_logps: B,
    ref_chosen_logps: B,
    ref_contrast_logps: B,
    *,
    beta: float = 0.1,
) -> tuple[B, Metrics]:
    """Re-Align's context-contrast term (Xing et al., 2025, "Re-Align: Aligning Vision Language
    Models via Retrieval-Augmented Direct Preference Optimization"), text form.

        loss = -logsig(beta [s(y_w | x) - s(y_w | x')]),   s(y | c) = logp(y | c) - ref(y | c),

    a DPO whose rejected side is the chosen response y_w under an alternative context x' (the
    record's ``contrast_prompt``): the policy learns to ground y_w in its own prompt. The paper
    contrasts images; the text form and the use of y_w on both sides are jaxalign's reading of
    it (catalog: unverified). Re-Align's full objective adds DPO on (y_w, y_l): the mix
    ``(("dpo", 1.0), ("realign", 1.0))`` in the same batch. Metrics: ``realign/chosen`` and
    ``realign/contrast`` (beta s), ``realign/accuracy``, ``realign/margin``.
    """
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    contrast = beta * (policy_contrast_logps - ref_contrast_logps)
    metrics = paired_metrics(chosen, contrast)
    metrics = {k.replace("rewards/", "realign/"): v for k, v in metrics.items()}
    metrics["realign/contrast"] = metrics.pop("realign/rejected")
    return -jax.nn.log_sigmoid(chosen - contrast), metrics
