"""Paired preference losses (METHODS.md section 1), reference-based and reference-free.

Every loss is a pure function of sequence log-probs (sums over response tokens) and data fields
and returns ``(loss [B], metrics)``; the trainer averages the per-example loss with its masks and
weights.

Notation: ``s(y) = logp(y) - ref(y)``, ``D = s(y_w) - s(y_l)``, ``avg(y) = logp(y) / |y|``,
``eps`` = label smoothing. Lengths ``|y|`` are float token counts of the response, clamped to
>= 1 so padding pairs stay finite.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

Metrics = dict[str, Array]
B = Float[Array, "B"]


def paired_metrics(chosen_rewards: B, rejected_rewards: B) -> Metrics:
    """Per-example reward metrics of a pair loss: implicit rewards, accuracy and margin."""
    chosen_rewards = jax.lax.stop_gradient(chosen_rewards)
    rejected_rewards = jax.lax.stop_gradient(rejected_rewards)
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracy": (chosen_rewards > rejected_rewards).astype(jnp.float32),
        "rewards/margin": chosen_rewards - rejected_rewards,
    }


def check_range(
    name: str,
    value: float,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = True,
) -> None:
    """Validate a concrete hyperparameter against an interval (skipped for traced values)."""
    if isinstance(value, int | float):
        above = low < value if low_open else low <= value
        below = value < high if high_open else value <= high
        if not (above and below):
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise ValueError(f"{name}={value} must lie in {interval}")


def _safe_len(lengths: B) -> B:
    return jnp.maximum(lengths, 1.0)


def _sigmoid_loss(z: B, label_smoothing: float) -> B:
    """-(1 - eps) logsig(z) - eps logsig(-z)."""
    eps = label_smoothing
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def _log1mexp(x: B) -> B:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler, 2012): log(-expm1(x)) near 0,
    log1p(-exp(x)) far from it. The unused branch gets a safe argument, so gradients stay
    finite."""
    near = x > -jnp.log(2.0)
    x_near = jnp.where(near, x, -1.0)
    x_far = jnp.where(near, -1.0, x)
    return jnp.where(near, jnp.log(-jnp.expm1(x_near)), jnp.log1p(-jnp.exp(x_far)))


def _rewards(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    ref_chosen_logps: B,
    ref_rejected_logps: B,
    beta: float,
) -> tuple[B, B]:
    """beta * s(y_w), beta * s(y_l)."""
    return (
        beta * (policy_chosen_logps - ref_chosen_logps),
        beta * (policy_rejected_logps - ref_rejected_logps),
    )


def dpo(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    ref_chosen_logps: B,
    ref_rejected_logps: B,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[B, Metrics]:
    """Direct Preference Optimization (Rafailov et al., 2023); conservative DPO with label
    smoothing (Mitchell, 2023).

    loss = -(1 - eps) logsig(beta D) - eps logsig(-beta D),   D = s(y_w) - s(y_l).

    Joint preference (DOVE / JPO, Bansal et al., 2024): the two sides may have different prompts;
    with ``data.train_on_prompt=True`` the trainer also counts the prompt tokens in ``logp``
    (loss mask over prompt + response). That is a masking choice upstream; this function is the
    same.
    """
    check_range("label_smoothing", label_smoothing, 0.0, 1.0)
    chosen, rejected = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return _sigmoid_loss(chosen - rejected, label_smoothing), paired_metrics(chosen, rejected)


def robust(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    ref_chosen_logps: B,
    ref_rejected_logps: B,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[B, Metrics]:
    """Robust DPO under label noise (Chowdhury et al., 2024): unbiased for flip rate eps.

    loss = [-(1 - eps) logsig(beta D) + eps logsig(-beta D)] / (1 - 2 eps),   eps in [0, 0.5).
    """
    check_range("label_smoothing", label_smoothing, 0.0, 0.5)
    eps = label_smoothing
    chosen, rejected = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    z = chosen - rejected
    loss = (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2 * eps)
    return loss, paired_metrics(chosen, rejected)


def hinge(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    ref_chosen_logps: B,
    ref_rejected_logps: B,
    *,
    beta: float = 0.1,
) -> tuple[B, Metrics]:
    """Hinge loss on the DPO margin, SLiC (Zhao et al., 2023) as used by RSO (Liu et al., 2024).

    loss = max(0, 1 - beta D).
    """
    chosen, rejected = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return jax.nn.relu(1.0 - (chosen - rejected)), paired_metrics(chosen, rejected)


def ipo(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    ref_chosen_logps: B,
    ref_rejected_logps: B,
    chosen_lengths: B,
    rejected_lengths: B,
    *,
    beta: float = 0.1,
) -> tuple[B, Metrics]:
    """Identity Preference Optimisation (Azar et al., 2023), length-normalised as TRL and
    OpenRLHF use it.

    loss = (D_avg - 1 / (2 beta))^2,   D_avg = s(y_w) / |y_w| - s(y_l) / |y_l|.

    Metrics report the length-normalised rewards beta * s(y) / |y|.
    """
    chosen = (policy_chosen_logps - ref_chosen_logps) / _safe_len(chosen_lengths)
    rejected = (policy_rejected_logps - ref_rejected_logps) / _safe_len(rejected_lengths)
    loss = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return loss, paired_metrics(beta * chosen, beta * rejected)


def exo_pair(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    ref_chosen_logps: B,
    ref_rejected_logps: B,
    *,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
) -> tuple[B, Metrics]:
    """EXO, efficient exact optimisation, pairwise form (Ji et al., 2024): reverse KL from the
    policy's pair distribution sig(+-beta D) to the smoothed labels (1 - eps, eps), eps > 0.

    loss = sig(beta D) [logsig(beta D) - log(1 - eps)] + sig(-beta D) [logsig(-beta D) - log eps].
    """
    check_range("label_smoothing", label_smoothing, 0.0, 1.0, low_open=True)
    eps = label_smoothing
    chosen, rejected = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    z = chosen - rejected
    loss = jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-eps)) + jax.nn.sigmoid(-z) * (
        jax.nn.log_sigmoid(-z) - jnp.log(eps)
    )
    return loss, paired_metrics(chosen, rejected)


def nca_pair(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    ref_chosen_logps: B,
    ref_rejected_logps: B,
    *,
    beta: float = 0.1,
) -> tuple[B, Metrics]:
    """Noise Contrastive Alignment, pairwise NCA (Chen et al., 2024).

    loss = -logsig(beta s_w) - 0.5 logsig(-beta s_w) - 0.5 logsig(-beta s_l).
    """
    chosen, rejected = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    loss = (
        -jax.nn.log_sigmoid(chosen)
        - 0.5 * jax.nn.log_sigmoid(-chosen)
        - 0.5 * jax.nn.log_sigmoid(-rejected)
    )
    return loss, paired_metrics(chosen, rejected)


def bco_pair(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    ref_chosen_logps: B,
    ref_rejected_logps: B,
    delta: Float[Array, ""] | float = 0.0,
    *,
    beta: float = 0.1,
) -> tuple[B, Metrics]:
    """Binary Classifier Optimization on pairs (Jung et al., 2024).

    loss = -logsig(beta s_w - delta) - logsig(-(beta s_l - delta)).

    ``delta`` is the running mean of the rewards beta * s over every response seen so far; the
    trainer carries it as state and passes it in (delta = 0 is the common peer variant). To
    update it, the trainer takes the masked batch mean of ``metrics["delta/batch_reward"]`` (per
    pair the mean of beta * s_w and beta * s_l, so its mean over pairs is the mean over all 2B
    rewards) and folds it into its running mean.
    """
    chosen, rejected = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    loss = -jax.nn.log_sigmoid(chosen - delta) - jax.nn.log_sigmoid(-(rejected - delta))
    metrics = paired_metrics(chosen, rejected)
    metrics["delta/batch_reward"] = 0.5 * (metrics["rewards/chosen"] + metrics["rewards/rejected"])
    return loss, metrics


def sppo_hard(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    ref_chosen_logps: B,
    ref_rejected_logps: B,
    *,
    beta: float = 0.1,
) -> tuple[B, Metrics]:
    """Self-Play Preference Optimization, hard labels (Wu et al., 2024): win probability 1 for
    y_w and 0 for y_l.

    loss = (s_w - 1 / (2 beta))^2 + (s_l + 1 / (2 beta))^2.
    """
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    half = 1.0 / (2.0 * beta)
    loss = (chosen - half) ** 2 + (rejected + half) ** 2
    return loss, paired_metrics(beta * chosen, beta * rejected)


def apo_zero(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    ref_chosen_logps: B,
    ref_rejected_logps: B,
    *,
    beta: float = 0.1,
) -> tuple[B, Metrics]:
    """Anchored Preference Optimization, APO-zero (D'Oosterlinck et al., 2024): y_w up, y_l down.

    loss = (1 - sig(beta s_w)) + sig(beta s_l).
    """
    chosen, rejected = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    loss = (1.0 - jax.nn.sigmoid(chosen)) + jax.nn.sigmoid(rejected)
    return loss, paired_metrics(chosen, rejected)


def apo_down(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    ref_chosen_logps: B,
    ref_rejected_logps: B,
    *,
    beta: float = 0.1,
) -> tuple[B, Metrics]:
    """Anchored Preference Optimization, APO-down (D'Oosterlinck et al., 2024): both down, y_l
    more.

    loss = sig(beta s_w) + (1 - sig(beta D)).
    """
    chosen, rejected = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    loss = jax.nn.sigmoid(chosen) + (1.0 - jax.nn.sigmoid(chosen - rejected))
    return loss, paired_metrics(chosen, rejected)


def sigmoid_norm(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    ref_chosen_logps: B,
    ref_rejected_logps: B,
    chosen_lengths: B,
    rejected_lengths: B,
    *,
    beta: float = 0.1,
) -> tuple[B, Metrics]:
    """DPO on length-normalised implicit rewards (OpenRLHF / PRIME ``sigmoid_norm``).

    loss = -logsig(beta (s_w / |y_w| - s_l / |y_l|)).
    """
    chosen = beta * (policy_chosen_logps - ref_chosen_logps) / _safe_len(chosen_lengths)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps) / _safe_len(rejected_lengths)
    return -jax.nn.log_sigmoid(chosen - rejected), paired_metrics(chosen, rejected)


def rpo(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    ref_chosen_logps: B,
    ref_rejected_logps: B,
    chosen_lengths: B,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    alpha: float = 1.0,
) -> tuple[B, Metrics]:
    """Iterative Reasoning Preference Optimization, DPO + NLL (Pang et al., 2024).

    loss = dpo(beta, eps) + alpha NLL(y_w),   NLL(y_w) = -logp(y_w) / |y_w|
    (the token-mean cross-entropy of the chosen response).
    """
    loss, metrics = dpo(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        label_smoothing=label_smoothing,
    )
    nll = -policy_chosen_logps / _safe_len(chosen_lengths)
    metrics["nll/chosen"] = jax.lax.stop_gradient(nll)
    return loss + alpha * nll, metrics


def ld_dpo(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    ref_chosen_logps: B,
    ref_rejected_logps: B,
    policy_chosen_prefix_logps: B,
    policy_rejected_prefix_logps: B,
    ref_chosen_prefix_logps: B,
    ref_rejected_prefix_logps: B,
    *,
    beta: float = 0.1,
    alpha: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[B, Metrics]:
    """Length-desensitised DPO, LD-DPO (Liu et al., 2024).

    Interface: besides the full sums, the trainer passes the sums over the *common prefix* of
    each response, its first min(|y_w|, |y_l|) response tokens (``*_prefix_logps``), for policy
    and reference. Tokens past that length count alpha times:

        logp_ld(y) = prefix(y) + alpha (logp(y) - prefix(y))     (policy and reference alike),

    and the loss is dpo on logp_ld. alpha = 1 is dpo; alpha in [0, 1], default 0.5.
    """
    check_range("alpha", alpha, 0.0, 1.0, high_open=False)

    def desensitise(full: B, prefix: B) -> B:
        return prefix + alpha * (full - prefix)

    return dpo(
        desensitise(policy_chosen_logps, policy_chosen_prefix_logps),
        desensitise(policy_rejected_logps, policy_rejected_prefix_logps),
        desensitise(ref_chosen_logps, ref_chosen_prefix_logps),
        desensitise(ref_rejected_logps, ref_rejected_prefix_logps),
        beta=beta,
        label_smoothing=label_smoothing,
    )


def modpo(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    ref_chosen_logps: B,
    ref_rejected_logps: B,
    chosen_margins: Float[Array, "B M"],
    rejected_margins: Float[Array, "B M"],
    *,
    weights: Sequence[float],
    beta: float = 0.1,
) -> tuple[B, Metrics]:
    """Multi-Objective DPO, MODPO (Zhou et al., 2024).

    loss = -logsig(g(y_w) - g(y_l)),   g(y) = (beta s(y) - w_rest . m(x, y)) / w_0,

    ``weights = (w_0, w_1, ..., w_M)`` are the objective weights (w_0 for the objective being
    trained, no default); ``*_margins`` [B, M] hold the per-response outputs m(x, y) of the M
    other, fixed reward models (a data field). Metrics report g(y) as the rewards.
    """
    w = jnp.asarray(weights, dtype=jnp.result_type(policy_chosen_logps))
    m = chosen_margins.shape[-1]
    if w.shape != (m + 1,):
        raise ValueError(f"modpo: weights has {w.shape[0]} entries, expected 1 + M = {m + 1}")
    chosen, rejected = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    g_chosen = (chosen - chosen_margins @ w[1:]) / w[0]
    g_rejected = (rejected - rejected_margins @ w[1:]) / w[0]
    return -jax.nn.log_sigmoid(g_chosen - g_rejected), paired_metrics(g_chosen, g_rejected)


def simpo(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    chosen_lengths: B,
    rejected_lengths: B,
    *,
    beta: float = 2.0,
    gamma: float | None = None,
    gamma_beta_ratio: float = 0.5,
) -> tuple[B, Metrics]:
    """SimPO (Meng et al., 2024): reference-free, length-normalised rewards, target margin.

    loss = -logsig(beta (avg(y_w) - avg(y_l)) - gamma).

    Defaults: beta = 2.0 and gamma = gamma_beta_ratio * beta = 1.0 (the paper's ratio 0.5);
    passing ``gamma`` sets the margin directly and ``gamma_beta_ratio`` is then ignored.
    """
    margin = gamma_beta_ratio * beta if gamma is None else gamma
    chosen = beta * policy_chosen_logps / _safe_len(chosen_lengths)
    rejected = beta * policy_rejected_logps / _safe_len(rejected_lengths)
    return -jax.nn.log_sigmoid(chosen - rejected - margin), paired_metrics(chosen, rejected)


def cpo(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    chosen_lengths: B,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    alpha: float = 1.0,
) -> tuple[B, Metrics]:
    """Contrastive Preference Optimization (Xu et al., 2024), reference-free.

    loss = -(1 - eps) logsig(beta d) - eps logsig(-beta d) + alpha NLL(y_w),
    d = logp(y_w) - logp(y_l),   NLL(y_w) = -logp(y_w) / |y_w| (token-mean cross-entropy).
    """
    check_range("label_smoothing", label_smoothing, 0.0, 1.0)
    chosen = beta * policy_chosen_logps
    rejected = beta * policy_rejected_logps
    nll = -policy_chosen_logps / _safe_len(chosen_lengths)
    metrics = paired_metrics(chosen, rejected)
    metrics["nll/chosen"] = jax.lax.stop_gradient(nll)
    return _sigmoid_loss(chosen - rejected, label_smoothing) + alpha * nll, metrics


def orpo(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    chosen_lengths: B,
    rejected_lengths: B,
    *,
    lam: float = 0.1,
) -> tuple[B, Metrics]:
    """Odds Ratio Preference Optimization (Hong et al., 2024), reference-free.

    loss = NLL(y_w) - lam logsig(log_odds),   NLL(y_w) = -avg(y_w),
    log_odds = (avg_w - avg_l) - [log(1 - exp(avg_w)) - log(1 - exp(avg_l))],

    with log(1 - exp(.)) computed stably. Metrics: rewards are lam * avg(y), as TRL reports them.
    """
    avg_chosen = policy_chosen_logps / _safe_len(chosen_lengths)
    avg_rejected = policy_rejected_logps / _safe_len(rejected_lengths)
    log_odds = (avg_chosen - avg_rejected) - (_log1mexp(avg_chosen) - _log1mexp(avg_rejected))
    metrics = paired_metrics(lam * avg_chosen, lam * avg_rejected)
    metrics["nll/chosen"] = jax.lax.stop_gradient(-avg_chosen)
    metrics["orpo/log_odds"] = jax.lax.stop_gradient(log_odds)
    return -avg_chosen - lam * jax.nn.log_sigmoid(log_odds), metrics


# P1 variants of METHODS.md section 1.


def discopop(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    ref_chosen_logps: B,
    ref_rejected_logps: B,
    *,
    beta: float = 0.1,
    tau: float = 0.05,
) -> tuple[B, Metrics]:
    """DiscoPOP, log-ratio modulated loss discovered by LLM search (Chaudhari et al., 2024).

    z = beta D, m = sig(z / tau):   loss = (1 - m)(-logsig z) + m exp(-z),

    with m exp(-z) evaluated as exp(logsig(z / tau) - z), finite for any z when tau < 1.
    """
    chosen, rejected = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    z = chosen - rejected
    logistic = -jax.nn.sigmoid(-z / tau) * jax.nn.log_sigmoid(z)
    exponential = jnp.exp(jax.nn.log_sigmoid(z / tau) - z)
    return logistic + exponential, paired_metrics(chosen, rejected)


def aot(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    ref_chosen_logps: B,
    ref_rejected_logps: B,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[B, Metrics]:
    """Alignment via Optimal Transport, paired (Melnyk et al., 2024): dpo on the quantiles of
    the batch,

    loss_k = dpo(beta, eps) on d_k = sort(logp_w - logp_l)_k - sort(ref_w - ref_l)_k.

    The loss entries are in sorted order, not example order, so every row of the (global)
    batch takes part in the sort: feed batches without padding pairs.
    """
    chosen, rejected = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    delta = jnp.sort(policy_chosen_logps - policy_rejected_logps) - jnp.sort(
        ref_chosen_logps - ref_rejected_logps
    )
    return _sigmoid_loss(beta * delta, label_smoothing), paired_metrics(chosen, rejected)


def aot_unpaired(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    ref_chosen_logps: B,
    ref_rejected_logps: B,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[B, Metrics]:
    """Alignment via Optimal Transport, unpaired (Melnyk et al., 2024): first-order stochastic
    dominance of chosen over rejected rewards,

    loss_k = dpo(beta, eps) on d_k = sort(s_w)_k - sort(s_l)_k   (sorted order; no padding).
    """
    chosen, rejected = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return (
        _sigmoid_loss(jnp.sort(chosen) - jnp.sort(rejected), label_smoothing),
        paired_metrics(chosen, rejected),
    )


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
MAX_EXPONENT = 50.0


def f_dpo(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    ref_chosen_logps: B,
    ref_rejected_logps: B,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> tuple[B, Metrics]:
    """f-DPO (Wang et al., 2023): dpo with each log-ratio s replaced by f'(exp s),

    reverse_kl: s;   forward_kl: 1 - exp(-s);   js: log 2 + logsig(s);
    alpha: (exp((a - 1) s) - 1) / (a - 1), a = ``f_alpha`` (a -> 1 is reverse KL; this is the
    paper's alpha-divergence with alpha_paper = 1 - a).

    Exponents are capped at MAX_EXPONENT = 50 so float32 stays finite; past the cap the loss is
    saturated (|beta D| > 1e20) and its gradient there is zero.
    """
    if divergence not in F_DIVERGENCES:
        raise ValueError(f"f_dpo: divergence {divergence!r} is not one of {F_DIVERGENCES}")

    def f_prime(s: B) -> B:
        if divergence == "forward_kl":
            return -jnp.expm1(jnp.minimum(-s, MAX_EXPONENT))
        if divergence == "js":
            return jnp.log(2.0) + jax.nn.log_sigmoid(s)
        if divergence == "alpha":
            return jnp.expm1(jnp.minimum((f_alpha - 1.0) * s, MAX_EXPONENT)) / (f_alpha - 1.0)
        return s

    chosen = f_prime(policy_chosen_logps - ref_chosen_logps)
    rejected = f_prime(policy_rejected_logps - ref_rejected_logps)
    return (
        _sigmoid_loss(beta * (chosen - rejected), label_smoothing),
        paired_metrics(beta * chosen, beta * rejected),
    )


def mm_dpo(
    policy_chosen_logps: B,
    policy_rejected_logps: B,
    ref_chosen_logps: B,
    ref_rejected_logps: B,
    beta_feature: B,
    *,
    beta: float = 0.1,
    w: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[B, Metrics]:
    """DPO with per-example dynamic beta (MM-DPO, METHODS.md section 1):

    beta_i = beta (1 + w f_i),   loss_i = dpo(beta_i, eps),

    ``beta_feature`` f [B] a per-pair data field (e.g. a transformed reward-model margin).
    """
    beta_i = beta * (1.0 + w * beta_feature)
    chosen, rejected = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta_i
    )
    metrics = paired_metrics(chosen, rejected)
    metrics["beta"] = jax.lax.stop_gradient(beta_i)
    return _sigmoid_loss(chosen - rejected, label_smoothing), metrics


def logo(
    policy_chosen_logps: B,
    policy_rejected_logps: Float[Array, "B M"],
    chosen_lengths: B,
    rejected_lengths: Float[Array, "B M"],
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    lam: float = 0.1,
) -> tuple[B, Metrics]:
    """LOGO (Tang et al., 2024), reference-free with M rejected responses per prompt. The exact
    published form is unverified; this is the METHODS.md form:

    loss = -logsig(beta avg(y_w) - (1/M) sum_j beta avg(y_l^j) - gamma) + lam NLL(y_w),
    NLL(y_w) = -avg(y_w).   Defaults beta 2.0, gamma 1.0 (the SimPO ratio), lam 0.1 are choices.
    """
    avg_chosen = policy_chosen_logps / _safe_len(chosen_lengths)
    chosen = beta * avg_chosen
    rejected = beta * jnp.mean(policy_rejected_logps / _safe_len(rejected_lengths), axis=-1)
    loss = -jax.nn.log_sigmoid(chosen - rejected - gamma) - lam * avg_chosen
    metrics = paired_metrics(chosen, rejected)
    metrics["nll/chosen"] = jax.lax.stop_gradient(-avg_chosen)
    return loss, metrics


def wpo_weights(
    chosen_token_logps: Float[Array, "B T"],
    chosen_sum_sq_probs: Float[Array, "B T"],
    chosen_mask: Float[Array, "B T"],
    rejected_token_logps: Float[Array, "B T"],
    rejected_sum_sq_probs: Float[Array, "B T"],
    rejected_mask: Float[Array, "B T"],
) -> B:
    """Weighted Preference Optimization pair weights (Zhou et al., 2024), stop-gradient:

    w(y) = exp(mean_t [logp_t - log sum_v p_v^2]) over the response tokens of y,
    w_pair = w(y_w) w(y_l);   the trainer multiplies the per-pair loss by w_pair.

    Per-token log-probs and sum_v p_v^2 come from ``kernels.token_logprobs(...,
    return_sum_sq=True)``; ``*_mask`` marks the response tokens.
    """

    def side(logps: Float[Array, "B T"], sum_sq: Float[Array, "B T"], mask: Float[Array, "B T"]):
        terms = (logps - jnp.log(jnp.where(mask > 0, sum_sq, 1.0))) * mask
        return jnp.sum(terms, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)

    log_w = side(chosen_token_logps, chosen_sum_sq_probs, chosen_mask) + side(
        rejected_token_logps, rejected_sum_sq_probs, rejected_mask
    )
    return jax.lax.stop_gradient(jnp.exp(log_w))
