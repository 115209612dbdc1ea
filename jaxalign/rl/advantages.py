"""Advantages and returns for online RL (METHODS.md section 5): GAE, GRPO group normalisation
(and Dr.GRPO), RLOO, REINFORCE++, masked whitening.

Layout. Token arrays are ``[B, T]`` with a float ``mask [B, T]``: 1 on the completion's tokens,
including the EOS that ended it (so stopping is trained), 0 on padding. Sequence arrays are
``[B]``. ``B = prompts x G``: completion i belongs to prompt ``i // G``, so groups are contiguous
rows. Every function is pure and jittable, float32 in and out, and returns 0 on padding.

Usage, per family (rewards [B] from ``jaxalign.rl.rewards``, values / KL from the kernels)::

    adv = token_level(group_advantages(rewards, G), mask)                     # grpo
    adv = token_level(group_advantages(rewards, G, scale="none"), mask)       # dr_grpo
    adv = token_level(rloo_advantages(rewards, G), mask)                      # rloo
    adv = reinforce_pp_advantages(rewards, token_kl, mask, kl_coef=0.01)      # reinforce++
    token_rewards = kl_shaped_rewards(rewards, kl_k1(old_logps, ref_logps), mask, kl_coef=0.05)
    adv, returns = gae(token_rewards, values, mask, gamma=1.0, lam=0.95)      # ppo
    adv = whiten(adv, mask)                                                   # PPO-max

Standard deviations use the sample estimator (ddof=1, Bessel's correction), as ``torch.std`` in
TRL and verl, so advantages carry the peers' scale; a count of 1 gives std 0 (never a division by
zero). These functions are meant to run outside the gradient (advantages are constants of the
policy loss); they are still differentiable and their gradients are finite everywhere.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

SeqArray = Float[Array, "B"]
TokenArray = Float[Array, "B T"]

SCALES = ("group", "batch", "none")


def _safe_sqrt(x: Array) -> Array:
    """sqrt with a finite gradient at 0 (a group of equal rewards has std 0)."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _check_groups(batch: int, group_size: int, fn: str) -> None:
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"jaxalign: {fn}: group_size must be a positive int, got {group_size!r}")
    if batch % group_size:
        raise ValueError(
            f"jaxalign: {fn}: group_size {group_size} does not divide the batch of {batch} "
            "completions (expected prompts x group_size rows, groups contiguous)"
        )


def _last_token(mask: TokenArray) -> TokenArray:
    """One-hot [B, T] of each row's last real token (all zeros on an empty row)."""
    real = mask > 0
    steps = real.shape[1]
    last = steps - 1 - jnp.argmax(real[:, ::-1], axis=1)
    onehot = jax.nn.one_hot(last, steps, dtype=jnp.float32)
    return onehot * jnp.any(real, axis=1, keepdims=True)


def gae(
    rewards: TokenArray,
    values: TokenArray,
    mask: TokenArray,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[TokenArray, TokenArray]:
    """Generalised advantage estimation (Schulman et al., 2016), a reverse ``lax.scan`` over T.

    delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V_t.

    ``t + 1`` is the next *real* token of the row: padding positions are skipped (their rewards
    and values are never read), and after the last real token ``V = 0`` and ``A = 0`` (a finished
    completion bootstraps nothing), as verl's ``compute_gae_advantage_return``. Returns
    ``(advantages, returns)``, both 0 on padding. PPO-max whitens the advantages afterwards
    (``whiten``); the returns, the value targets, are not whitened.
    """
    real = mask > 0

    def step(carry, xs):
        next_value, next_adv = carry
        r, v, m = xs
        adv = r + gamma * next_value - v + gamma * lam * next_adv
        carry = (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv))
        return carry, jnp.where(m, adv, 0.0)

    zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
    xs = (rewards.astype(jnp.float32).T, values.astype(jnp.float32).T, real.T)
    _, adv = jax.lax.scan(step, (zeros, zeros), xs, reverse=True)
    adv = adv.T
    returns = jnp.where(real, adv + values.astype(jnp.float32), 0.0)
    return adv, returns


def group_advantages(
    rewards: SeqArray,
    group_size: int,
    *,
    scale: str = "group",
    eps: float = 1e-6,
) -> SeqArray:
    """GRPO group-normalised advantages (Shao et al., 2024) and the Dr.GRPO variant.

    A_i = (r_i - mean_g(r)) / (std + eps),

    mean over the G completions of the prompt of i. ``scale``: ``"group"`` std of the group (GRPO);
    ``"batch"`` std of all B rewards (group mean, batch std: Liu et al., 2025, "Tricks or Traps",
    TRL's ``scale_rewards="batch"``); ``"none"`` no division (Dr.GRPO, Liu et al., 2025; pair it
    with the ``"seq-mean-token-sum-norm"`` aggregation, which drops the length normalisation).

    std is the sample std (ddof=1) as TRL's and verl's ``torch.std``. A group whose rewards are all
    equal, and a group of size 1, get advantage 0: the numerator is 0 and the denominator is
    ``0 + eps`` (a size-1 group's std is taken as 0, never 0/0). ``eps`` 1e-6 as METHODS.md (TRL
    uses 1e-4). A ``group_size`` that does not divide B is a ValueError at trace time.
    """
    if scale not in SCALES:
        raise ValueError(f"jaxalign: group_advantages: scale={scale!r}; expected one of {SCALES}")
    batch = rewards.shape[0]
    _check_groups(batch, group_size, "group_advantages")
    grouped = rewards.astype(jnp.float32).reshape(-1, group_size)
    centered = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    if scale == "none":
        return centered.reshape(batch)
    if scale == "group":
        var = jnp.sum(jnp.square(centered), axis=1, keepdims=True) / max(group_size - 1, 1)
    else:
        flat = grouped - jnp.mean(grouped)
        var = jnp.sum(jnp.square(flat)) / max(batch - 1, 1)
    return (centered / (_safe_sqrt(var) + eps)).reshape(batch)


def rloo_advantages(rewards: SeqArray, group_size: int) -> SeqArray:
    """REINFORCE leave-one-out (Kool et al., 2019; Ahmadian et al., 2024).

    A_i = r_i - 1/(G-1) sum_{j != i} r_j = G/(G-1) (r_i - mean_g(r)),

    j over the other completions of the same prompt. Needs G >= 2 (ValueError at trace time).
    """
    batch = rewards.shape[0]
    _check_groups(batch, group_size, "rloo_advantages")
    if group_size < 2:
        raise ValueError(
            f"jaxalign: rloo_advantages needs group_size >= 2 (a leave-one-out baseline needs "
            f"another completion of the same prompt), got group_size={group_size}"
        )
    grouped = rewards.astype(jnp.float32).reshape(-1, group_size)
    others = (jnp.sum(grouped, axis=1, keepdims=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(batch)


def kl_shaped_rewards(
    rewards: SeqArray,
    token_kl: TokenArray,
    mask: TokenArray,
    *,
    kl_coef: float,
) -> TokenArray:
    """Per-token rewards with the KL penalty as reward shaping (Ziegler et al., 2019; PPO,
    REINFORCE++): the score at the last real token (the EOS, when the completion stopped).

    r_t = -kl_coef kl_t + [t = last real token of the row] r,   0 on padding.

    ``token_kl`` a per-token KL estimate, normally k1 (``jaxalign.kernels.kl_k1(old_logps,
    ref_logps)``: in the reward k1 gives the reverse-KL gradient, see ``jaxalign.losses.policy``).
    An empty row (mask all 0) gets no reward at all.
    """
    shaped = -kl_coef * token_kl.astype(jnp.float32)
    shaped = shaped + rewards.astype(jnp.float32)[:, None] * _last_token(mask)
    return jnp.where(mask > 0, shaped, 0.0)


def reinforce_pp_returns(
    rewards: SeqArray,
    token_kl: TokenArray,
    mask: TokenArray,
    *,
    kl_coef: float,
    gamma: float = 1.0,
) -> TokenArray:
    """KL-shaped discounted returns of REINFORCE++ (Hu, 2025), as OpenRLHF and verl.

    G_t = r_t + gamma G_{t+1},   r_t = ``kl_shaped_rewards(rewards, token_kl, mask, kl_coef)``,

    ``t + 1`` the next real token (padding is skipped, as in ``gae``); 0 on padding and after the
    last real token. An empty row returns 0 everywhere.
    """
    real = mask > 0
    token_rewards = kl_shaped_rewards(rewards, token_kl, mask, kl_coef=kl_coef)

    def step(next_return, xs):
        r, m = xs
        ret = r + gamma * next_return
        return jnp.where(m, ret, next_return), jnp.where(m, ret, 0.0)

    zeros = jnp.zeros(rewards.shape, jnp.float32)
    _, returns = jax.lax.scan(step, zeros, (token_rewards.T, real.T), reverse=True)
    return returns.T


def reinforce_pp_advantages(
    rewards: SeqArray,
    token_kl: TokenArray,
    mask: TokenArray,
    *,
    kl_coef: float,
    gamma: float = 1.0,
) -> TokenArray:
    """REINFORCE++ advantages: ``whiten(reinforce_pp_returns(...), mask)``, the returns normalised
    over every real token of the (global) batch; 0 on padding. Pass the whole batch of the step,
    not a minibatch, or the statistics differ."""
    returns = reinforce_pp_returns(rewards, token_kl, mask, kl_coef=kl_coef, gamma=gamma)
    return whiten(returns, mask)


def whiten(
    values: TokenArray,
    mask: TokenArray,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> TokenArray:
    """Masked whitening: (x - mean) / sqrt(var + eps), mean and var over real tokens only.

    var is the sample variance (ddof=1) as verl's and TRL's ``masked_whiten`` (OpenRLHF uses
    ddof=0; the two differ by N/(N-1) over N tokens). ``shift_mean=False`` adds the mean back
    (rescale only). 0 on padding; an all-padding input returns zeros.
    """
    real = mask > 0
    x = values.astype(jnp.float32)
    count = jnp.sum(real)
    mean = jnp.sum(jnp.where(real, x, 0.0)) / jnp.maximum(count, 1)
    centered = jnp.where(real, x - mean, 0.0)
    var = jnp.sum(jnp.square(centered)) / jnp.maximum(count - 1, 1)
    out = centered * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(real, out, 0.0)


def token_level(advantages: SeqArray, mask: TokenArray) -> TokenArray:
    """A sequence advantage on each of its completion tokens: A_{b,t} = A_b mask_{b,t}."""
    return jnp.where(mask > 0, advantages.astype(jnp.float32)[:, None], 0.0)
