"""Policy-gradient losses for online RL (METHODS.md section 5): the clipped PPO / GRPO / DAPO
objective with asymmetric and dual clip, GSPO's sequence-level ratio, loss aggregation, the
clipped value loss, truncated importance sampling, and where the KL estimators belong.

Unlike the sequence-level losses of the registry, these work on tokens: inputs are ``[B, T]``
per-token log-probs with a float ``mask [B, T]`` (1 on completion tokens, the EOS that ended the
completion included, 0 on padding), and they return a token loss ``[B, T]`` (0 on padding) that
``aggregate`` reduces. They are therefore not in ``jaxalign.losses.LOSSES``: the offline trainers
read that registry as ``(loss [B], metrics)`` functions of sequence log-probs, and
``needs_reference`` / ``required_inputs`` there assume that shape.

Assembling a policy objective (all terms token-level, then one aggregation)::

    A = token_level(group_advantages(rewards, G), mask)                     # jaxalign.rl.advantages
    pg, metrics = clipped_policy_loss(logps, old_logps, A, mask, clip_low=0.2, clip_high=0.28)
    pg = pg * truncated_importance_weights(old_logps, sampler_logps, mask)   # optional (TIS)
    token_loss = (
        pg
        + kl_coef * kl_k3(logps, ref_logps) * mask      # KL as a loss term (GRPO); see below
        - entropy_coef * entropy * mask                 # entropy bonus (entropy from the kernels)
    )
    loss_sum, weight = aggregate(token_loss, mask, "token-mean")
    loss = loss_sum / max(weight, 1)      # sum loss_sum and weight over micro-batches first
    loss = loss + ptx_coef * sft_nll      # PPO-ptx: jaxalign.losses.sft on a pretraining batch
    # PPO's critic: value_loss(values, old_values, returns, mask, clip=0.2), aggregated alike.

The entropy bonus is ``-entropy_coef * entropy`` per token (``jaxalign.kernels.token_logprobs``
returns the entropy); PPO-ptx adds ``ptx_coef`` times the SFT NLL of a pretraining batch. Neither
has logic of its own, so neither has a function.

Where the KL estimators belong. With ``l = logp_ref - logp`` per sampled token,
k1 = -l, k2 = l^2 / 2, k3 = exp(l) - 1 - l (``kl_k1``, ``kl_k2``, ``kl_k3``, re-exported from
``jaxalign.kernels``, clamped to [-10, 10]). All three are estimated on samples from the policy
pi itself. As *values*, k1 and k3 are unbiased estimates of KL(pi || ref), k2 is biased. As
*gradients* of a loss term E_{y ~ sg(pi)}[k(y)] (the sampling distribution is not
differentiated, as in every trainer):

- k1 as a loss term has **zero expected gradient**: grad E[logp - logp_ref] = E[grad logp] = 0.
  It only adds noise. k1 belongs in the **reward** (``jaxalign.rl.advantages.kl_shaped_rewards``:
  r_t -= kl_coef k1_t, PPO / REINFORCE++): there the score-function gradient
  E[sg(k1) grad logp] is exactly grad KL(pi || ref).
- k2 as a loss term: grad E[k2] = E[(logp - logp_ref) grad logp] = grad KL(pi || ref), the
  reverse-KL gradient, unbiased on-policy.
- k3 as a loss term (GRPO, Shao et al. 2024): grad E[k3] = E[(1 - ref/pi) grad logp]
  = -E_ref[grad logp] = grad KL(ref || pi): the **forward**-KL gradient (mode-covering), not the
  gradient of the reverse KL that k3's value estimates (Tang & Munos, 2025, "On a few pitfalls
  in KL divergence gradient estimation for RL"). It is still a valid pull towards the reference,
  and it is what GRPO's results were obtained with.
- Off-policy (the update runs on samples of an older policy) these statements hold only after
  importance weighting; on the first minibatch of a step the ratio is exactly 1.

``tests/losses/test_policy.py`` pins each statement with exact expectations over a categorical.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxalign.kernels import LOG_RATIO_CLAMP, kl_k1, kl_k2, kl_k3
from jaxalign.losses.preference import check_range

TokenArray = Float[Array, "B T"]
Scalar = Float[Array, ""]
Metrics = dict[str, Array]

AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


def _ratio_metrics(
    ratio: TokenArray,
    log_ratio: TokenArray,
    advantages: TokenArray,
    real: Array,
    clip_low: float,
    clip_high: float,
) -> Metrics:
    """Token metrics: clip fractions of ``ratio``, approx KL from the token ``log_ratio``, ratio."""
    ratio, log_ratio, advantages = jax.lax.stop_gradient((ratio, log_ratio, advantages))

    def tokens(x):
        return jnp.where(real, x.astype(jnp.float32), 0.0)

    return {
        "clip_ratio/low": tokens((ratio < 1.0 - clip_low) & (advantages < 0)),
        "clip_ratio/high": tokens((ratio > 1.0 + clip_high) & (advantages > 0)),
        "approx_kl": tokens(jnp.expm1(log_ratio) - log_ratio),
        "ratio": tokens(ratio),
    }


def clipped_policy_loss(
    logps: TokenArray,
    old_logps: TokenArray,
    advantages: TokenArray,
    mask: TokenArray,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[TokenArray, Metrics]:
    """Clipped surrogate of PPO (Schulman et al., 2017) with the asymmetric clip of DAPO (Yu et
    al., 2025, "clip-higher") and the dual clip of Ye et al. (2020); the policy loss of PPO, GRPO,
    Dr.GRPO, DAPO, RLOO and REINFORCE++.

    rho_t = exp(logp_t - old_logp_t),
    l_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - clip_low, 1 + clip_high)),
    with ``dual_clip`` c > 1, for A_t < 0:  l_t = min(l_t, -A_t c)   (bounds the loss of a token
    whose ratio exploded under a negative advantage).

    ``logp - old_logp`` is clamped to +-20 before ``exp`` (as verl). Where the clipped branch wins
    the token has zero gradient (ties go to the unclipped branch, so at rho = 1 the loss is -A
    and its gradient -A grad logp). Returns ``(token_loss [B, T], metrics)``, 0 on padding.

    Metrics, each a token array [B, T] (0 on padding; reduce with the mask, e.g. ``aggregate(x,
    mask, "token-mean")``), names as TRL / verl:
    ``clip_ratio/low`` rho < 1 - clip_low with A < 0; ``clip_ratio/high`` rho > 1 + clip_high with
    A > 0; ``clip_ratio/dual`` (with ``dual_clip``) A < 0 and the dual bound active;
    ``approx_kl`` k3 = rho - 1 - log rho, an unbiased estimate of KL(old || new) on the old
    policy's samples (>= 0); ``ratio`` rho.
    """
    check_range("clip_low", clip_low, 0.0, 1.0)
    check_range("clip_high", clip_high, 0.0, float("inf"))
    if dual_clip is not None:
        check_range("dual_clip", dual_clip, 1.0, float("inf"), low_open=True)
    real = mask > 0
    logps, old_logps = logps.astype(jnp.float32), old_logps.astype(jnp.float32)
    log_ratio = jnp.clip(logps - old_logps, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    adv = advantages.astype(jnp.float32)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.where(clipped > unclipped, clipped, unclipped)
    metrics = _ratio_metrics(ratio, log_ratio, adv, real, clip_low, clip_high)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual = (adv < 0) & (bound < loss)
        loss = jnp.where(dual, bound, loss)
        metrics["clip_ratio/dual"] = jnp.where(real, dual.astype(jnp.float32), 0.0)
    return jnp.where(real, loss, 0.0), metrics


def gspo_policy_loss(
    logps: TokenArray,
    old_logps: TokenArray,
    advantages: TokenArray,
    mask: TokenArray,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
) -> tuple[TokenArray, Metrics]:
    """Group Sequence Policy Optimization (Zheng et al., 2025), token-level "GSPO-token" form.

    s_i = exp(1/|y_i| sum_t (logp_t - old_logp_t))            (the sequence ratio, length-normed)
    s_{i,t} = sg(s_i) exp(logp_t - sg(logp_t))                 (value s_i, gradient s_i grad logp_t)
    l_t = max(-A_t s_{i,t}, -A_t clip(s_{i,t}, 1 - clip_low, 1 + clip_high)),

    |y_i| the row's real-token count. With a sequence advantage broadcast on its tokens
    (``token_level``) and ``aggregate(..., "seq-mean-token-mean")`` the gradient equals that of
    GSPO's sequence objective max(-A s_i, -A clip(s_i)) averaged over sequences (tested). The clip
    decision is per sequence. Defaults are the paper's ranges (3e-4, 4e-4): a sequence ratio is a
    geometric mean, far closer to 1 than token ratios. Token log-ratios and log s are clamped to
    +-20.
    Returns ``(token_loss [B, T], metrics)`` with the metrics of ``clipped_policy_loss`` (no dual
    clip), ``ratio`` being s_i on each token and ``approx_kl`` the token-level k3.
    """
    check_range("clip_low", clip_low, 0.0, 1.0)
    check_range("clip_high", clip_high, 0.0, float("inf"))
    real = mask > 0
    logps, old_logps = logps.astype(jnp.float32), old_logps.astype(jnp.float32)
    log_ratio = jnp.clip(jnp.where(real, logps - old_logps, 0.0), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    length = jnp.maximum(jnp.sum(real, axis=1, keepdims=True), 1).astype(jnp.float32)
    seq_log_ratio = jax.lax.stop_gradient(jnp.sum(log_ratio, axis=1, keepdims=True) / length)
    token_log_s = seq_log_ratio + logps - jax.lax.stop_gradient(logps)
    token_log_s = jnp.clip(token_log_s, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    s = jnp.exp(token_log_s)
    adv = advantages.astype(jnp.float32)
    unclipped = -adv * s
    clipped = -adv * jnp.clip(s, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.where(clipped > unclipped, clipped, unclipped)
    metrics = _ratio_metrics(s, log_ratio, adv, real, clip_low, clip_high)
    return jnp.where(real, loss, 0.0), metrics


def aggregate(
    token_values: TokenArray,
    mask: TokenArray,
    mode: str,
    *,
    norm_length: int | None = None,
) -> tuple[Scalar, Scalar]:
    """Reduce a token loss to ``(loss_sum, weight)``; the loss is ``loss_sum / weight``.

    ============================  ==============================  =======================
    mode                          loss_sum                        weight
    ============================  ==============================  =======================
    ``token-mean``                sum_{b,t} l m                   sum_{b,t} m
    ``seq-mean-token-sum``        sum_{b,t} l m                   B_real
    ``seq-mean-token-mean``       sum_b (sum_t l m / sum_t m)     B_real
    ``seq-mean-token-sum-norm``   sum_{b,t} l m                   B_real * norm_length
    ============================  ==============================  =======================

    B_real counts rows with at least one real token (padding rows weigh nothing). Because both
    parts are sums over rows, summing ``loss_sum`` and ``weight`` over the micro-batches of a
    batch and dividing once gives the aggregate of the whole batch (tested): this is the global
    token mean, not a mean of micro-batch means. Divide by ``max(weight, 1)``: weight is 0 only
    when every row is padding, where ``loss_sum`` is 0 too.

    ``token-mean``: DAPO's token-level loss (long completions weigh more). ``seq-mean-token-mean``:
    the original GRPO / GSPO (each completion weighs 1). ``seq-mean-token-sum-norm``: Dr.GRPO
    (Liu et al., 2025), a constant ``norm_length`` (the max completion length) instead of each
    completion's length, so there is no length bias; verl's variant omits the 1/B_real, a constant
    factor. ``norm_length`` is required by that mode and rejected by the others.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"jaxalign: aggregate: mode={mode!r}; expected one of {AGGREGATIONS}")
    if (mode == "seq-mean-token-sum-norm") != (norm_length is not None):
        raise ValueError(
            "jaxalign: aggregate: norm_length (the max completion length) is required by "
            f"'seq-mean-token-sum-norm' and only by it; got mode={mode!r}, "
            f"norm_length={norm_length}"
        )
    if norm_length is not None:
        check_range("norm_length", norm_length, 1, float("inf"))
    real = mask > 0
    values = jnp.where(real, token_values.astype(jnp.float32), 0.0)
    tokens = jnp.sum(real, axis=1).astype(jnp.float32)
    rows = jnp.sum(tokens > 0).astype(jnp.float32)
    if mode == "token-mean":
        return jnp.sum(values), jnp.sum(tokens)
    if mode == "seq-mean-token-mean":
        return jnp.sum(jnp.sum(values, axis=1) / jnp.maximum(tokens, 1.0)), rows
    if mode == "seq-mean-token-sum":
        return jnp.sum(values), rows
    return jnp.sum(values), rows * norm_length


def value_loss(
    values: TokenArray,
    old_values: TokenArray,
    returns: TokenArray,
    mask: TokenArray,
    *,
    clip: float | None = 0.2,
) -> TokenArray:
    """Clipped value loss of PPO (as in OpenAI baselines, TRL and verl), per token.

    l_t = 0.5 max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -c, c) - R_t)^2),

    ``returns`` R the targets (from ``gae``), ``old_values`` the critic's values at rollout time.
    ``clip=None``: l_t = 0.5 (V_t - R_t)^2. Where the clipped branch wins, the gradient is 0.
    Returns the token loss [B, T], 0 on padding; reduce it with ``aggregate``.
    """
    if clip is not None:
        check_range("clip", clip, 0.0, float("inf"))
    real = mask > 0
    v, v_old, ret = (x.astype(jnp.float32) for x in (values, old_values, returns))
    loss = 0.5 * jnp.square(v - ret)
    if clip is not None:
        v_clipped = v_old + jnp.clip(v - v_old, -clip, clip)
        loss_clipped = 0.5 * jnp.square(v_clipped - ret)
        loss = jnp.where(loss_clipped > loss, loss_clipped, loss)
    return jnp.where(real, loss, 0.0)


def truncated_importance_weights(
    trainer_old_logps: TokenArray,
    sampler_logps: TokenArray,
    mask: TokenArray,
    *,
    cap: float = 2.0,
) -> TokenArray:
    """Truncated importance sampling (TIS; Yao et al., 2025, "Your efficient RL framework
    secretly brings you off-policy RL training").

    w_t = sg(min(exp(old_logp_t - sampler_logp_t), cap)),   0 on padding,

    ``trainer_old_logps`` the rollout's log-probs recomputed by the training kernels (the old
    policy), ``sampler_logps`` those the sampler reported for the same tokens (same temperature).
    Multiply the token policy loss by w: it corrects the sampler/trainer numeric mismatch, and the
    cap bounds the variance. No gradient flows through w.
    """
    check_range("cap", cap, 0.0, float("inf"), low_open=True)
    log_w = trainer_old_logps.astype(jnp.float32) - sampler_logps.astype(jnp.float32)
    log_w = jnp.minimum(log_w, jnp.log(cap))
    return jnp.where(mask > 0, jax.lax.stop_gradient(jnp.exp(log_w)), 0.0)


__all__ = [
    "AGGREGATIONS",
    "aggregate",
    "clipped_policy_loss",
    "gspo_policy_loss",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "truncated_importance_weights",
    "value_loss",
]
