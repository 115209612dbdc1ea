"""The policy update of the online families (ppo, grpo, rloo, reinforce_pp): an `Objective` on
rollout rows.

A rollout batch holds the rows of `jaxalign.rl.rollout.rollout_rows` plus what the rollout step
computed before the first update (`jaxalign.train.online`), all [R, T] and aligned with the
targets:

    old_logps      log-probs of the completion tokens under the params that sampled them
                   (the training kernels, temperature applied): the ratio's denominator; absent
                   with one update per rollout (`old_from_update`), where the update's own
                   forward gives them
    ref_logps      the reference policy's (KL as a loss term)
    advantages     per token
    old_values, returns   PPO's value head at rollout time and its GAE targets
    sampler_logps  the sampler's own log-probs (truncated importance sampling)

Per completion token, with pi the policy at the sampling temperature T (hidden states / T, the
distribution the tokens were drawn from, before top-k / top-p truncation: the ratio is computed
against that untruncated distribution, as the sampler reports it):

    token_loss = pg(ratio, A) [* TIS weight] + kl_coef * k3(logp, ref_logp) - entropy_coef * H
               (+ value_coef * value_loss with a value head)

reduced by `jaxalign.losses.policy.aggregate` (`rl.aggregation`), plus, with `rl.pair_coef` > 0
(GRAO, `jaxalign.losses.grao`), pair_coef times the mean over the micro-batch's groups of the
pairwise term (rows in contiguous groups of `rl.group_size`); pg is the clipped surrogate
(`rl.ratio="token"`) or GSPO's sequence ratio (`"sequence"`). The loss sum and its weight add up
over micro-batches, so gradient accumulation gives the whole minibatch's gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign import kernels, models
from jaxalign.data.layout import BatchSpec
from jaxalign.losses import policy
from jaxalign.losses.grao import grao_pairwise
from jaxalign.models import attention, heads
from jaxalign.models.functional import DROPOUT_KEY
from jaxalign.train.objectives import Objective


def old_from_update(rl, *, kl_in_loss: bool) -> bool:
    """Whether the ratio's denominator comes from the update's own forward.

    With one update per rollout (`rl.epochs` = `rl.minibatches` = 1) the params that sampled are
    the params being updated, so the old log-probs are the update's log-probs under
    stop-gradient, exactly (the ratio is exactly 1), and a forward of their own before the update
    would compute the same numbers again. Not when the advantages need the policy's k1 KL before
    the update (a KL shaped into the reward: ppo, rloo, reinforce_pp with `rl.kl_coef` > 0)."""
    return rl.epochs == 1 and rl.minibatches == 1 and (kl_in_loss or rl.kl_coef == 0)


def rollout_logps(
    model_config,
    params,
    rows,
    *,
    temperature,
    columns=None,
    group=1,
    mesh=None,
    rules=None,
    impl=None,
    entropy=False,
):
    """Log-probs of the targets at `temperature` (the sampling distribution) on the loss mask,
    0 elsewhere: [R, T]; with `entropy`, also the per-token entropy [R, T] and the hidden states
    of the scored columns (the last M, or all T).

    `columns` M: only the last M target columns can be counted (a rollout's completion columns,
    `jaxalign.rl.rollout`), so the vocabulary matmuls run on those alone and the other columns
    are 0; None: every column. `group` G > 1: the rows come in groups of G consecutive rows of
    one prompt (a rollout's layout, rows in order), whose first T - M columns are the same
    prompt, so the decoder runs them once per group (`shared_prompt`)."""
    decoder = heads.decoder_params(params)
    targets, mask = rows["targets"], rows["loss_mask"] > 0
    T = targets.shape[1]
    skip = 0 if columns is None else max(T - columns, 0)
    inputs = (rows["tokens"], rows["positions"], rows["segment_ids"])
    grouped = shared_prompt(model_config, decoder, rows["tokens"].shape, skip, group, mesh)
    if grouped:  # the scored columns only
        hidden = models.forward_grouped(
            model_config, decoder, *inputs, group=group, prefix=skip, mesh=mesh, rules=rules
        )
    else:
        hidden = models.forward(model_config, decoder, *inputs, mesh=mesh, rules=rules)
    scaled = hidden / jnp.asarray(temperature, hidden.dtype) if temperature != 1.0 else hidden
    if skip:
        targets, mask = targets[:, skip:], mask[:, skip:]
        if not grouped:
            hidden, scaled = hidden[:, skip:], scaled[:, skip:]
    unembedding = models.unembedding(model_config, params)
    kw = dict(
        mask=mask,
        implementation=impl,
        softcap=model_config.final_logit_softcap,
        return_entropy=entropy,
    )
    if mesh is None or mesh.size == 1:
        out = kernels.token_logprobs(scaled, unembedding, targets, **kw)
    else:
        out = kernels.sharded_token_logprobs(
            scaled,
            unembedding,
            targets,
            mesh=mesh,
            vocab_axis="tensor",
            token_axes=("data", "fsdp"),
            **kw,
        )

    if not entropy:
        return _full(out, T)
    logps, extras = out
    return _full(logps, T), _full(extras["entropy"], T), hidden


def _full(x, T: int):
    """[R, M] -> [R, T]: zeros in the first T - M columns."""
    return jnp.pad(x, ((0, 0), (T - x.shape[1], 0)))


def shared_prompt(model_config, decoder_params, shape, prompt: int, group: int, mesh) -> bool:
    """Whether `rollout_logps` runs rows [R, T] of groups of `group` rows sharing their first
    `prompt` columns through `models.forward_grouped`: groups of two or more that divide R, a
    shared prompt, no adapter dropout, and an attention that runs the XLA path at T
    (`attention.resolve`: the grouped forward attends as the cached one does; where the full
    forward takes a fused kernel it keeps it)."""
    R, T = shape
    return (
        group > 1
        and R % group == 0
        and prompt > 0
        and DROPOUT_KEY not in decoder_params
        and attention.resolve(model_config.attention, T, mesh) == "xla"
    )


def policy_objective(
    model_config,
    rl,
    *,
    kl_in_loss: bool,
    value_head: bool,
    mesh=None,
    rules=None,
    impl=None,
):
    """The clipped policy-gradient objective of `rl` (the config's `rl` section: ratio, clips,
    aggregation, kl_coef, entropy_coef, tis_cap, value_coef, value_clip). `kl_in_loss`: KL to the
    reference as a k3 loss term (grpo; the other families shape k1 into the reward instead);
    `value_head`: PPO's value loss on `params["value_head"]`. Metrics (token means):
    clip_ratio/low, clip_ratio/high, approx_kl (old -> new), kl (policy -> reference, k3),
    entropy, ratio, loss/policy, loss/value, values."""
    kl_loss = kl_in_loss and rl.kl_coef > 0
    own_old = old_from_update(rl, kl_in_loss=kl_in_loss)
    norm_length = rl.max_new_tokens if rl.aggregation == "seq-mean-token-sum-norm" else None
    # One pass over one minibatch keeps the rollout's rows in order (`online._minibatches`), and
    # micro-batches are contiguous slices of them: a prompt's samples stay together.
    in_order = rl.epochs == 1 and rl.minibatches == 1

    def fn(params, ref_params, micro, loss_state=None):
        del ref_params, loss_state  # the reference's log-probs come with the batch
        mask = micro["loss_mask"] * micro["example_mask"][:, None]
        T = mask.shape[1]
        logps, entropy, hidden = rollout_logps(
            model_config,
            params,
            micro,
            temperature=rl.temperature,
            columns=rl.max_new_tokens,
            group=rl.group_size if in_order else 1,
            mesh=mesh,
            rules=rules,
            impl=impl,
            entropy=True,
        )
        old = jax.lax.stop_gradient(logps) if own_old else micro["old_logps"]
        adv = micro["advantages"]
        if rl.ratio == "sequence":
            pg, metrics = policy.gspo_policy_loss(
                logps, old, adv, mask, clip_low=rl.clip_low, clip_high=rl.clip_high
            )
        else:
            pg, metrics = policy.clipped_policy_loss(
                logps,
                old,
                adv,
                mask,
                clip_low=rl.clip_low,
                clip_high=rl.clip_high,
                dual_clip=rl.dual_clip or None,
            )
        if rl.tis_cap:
            pg = pg * policy.truncated_importance_weights(
                old, micro["sampler_logps"], mask, cap=rl.tis_cap
            )
        token_loss = pg - rl.entropy_coef * entropy
        metrics = dict(metrics) | {
            "entropy": entropy,
            "loss/policy": pg,
            "sampler_logprob_diff": jnp.abs(old - micro["sampler_logps"]),
        }
        if kl_loss:
            kl = policy.kl_k3(logps, micro["ref_logps"])
            token_loss = token_loss + rl.kl_coef * kl
            metrics["kl"] = kl
        if value_head:
            values = _full(heads.apply_scalar_head(params[heads.VALUE_HEAD], hidden), T)
            vloss = policy.value_loss(
                values, micro["old_values"], micro["returns"], mask, clip=rl.value_clip or None
            )
            token_loss = token_loss + rl.value_coef * vloss
            metrics |= {"loss/value": vloss, "values": values}
        loss_sum, weight = policy.aggregate(
            token_loss, mask, rl.aggregation, norm_length=norm_length
        )
        # Token means of this micro-batch, weighted like its loss (the step divides every metric
        # sum by the total weight): exact for one micro-batch, a weighted mean of means else.
        tokens = jnp.maximum(mask.sum(), 1.0)
        sums = {k: jnp.where(mask > 0, v, 0.0).sum() / tokens * weight for k, v in metrics.items()}
        if rl.pair_coef:
            lengths = jnp.maximum(mask.sum(1), 1.0)
            share, pair_metrics = grao_pairwise(
                (logps * mask).sum(1) / lengths,
                (adv * mask).sum(1) / lengths,
                (mask.sum(1) > 0).astype(jnp.float32),
                group_size=rl.group_size,
                beta=rl.pair_beta,
            )
            loss_sum = loss_sum + rl.pair_coef * share.mean() * weight
            sums |= {k: v.mean() * weight for k, v in pair_metrics.items()}
        return loss_sum, weight, sums

    fields = ["advantages", "sampler_logps"] + ([] if own_old else ["old_logps"])
    fields += ["ref_logps"] if kl_loss else []
    fields += ["old_values", "returns"] if value_head else []
    batch = BatchSpec("rollout", token_fields=tuple(fields))
    return Objective(fn, batch, needs_ref=rl.kl_coef > 0)


def value_estimates(model_config, params, rows, *, mesh=None, rules=None):
    """The value head on every position of the rollout rows: [R, T] float32 (position c values
    the state whose next token is target c)."""
    hidden = models.forward(
        model_config,
        heads.decoder_params(params),
        rows["tokens"],
        rows["positions"],
        rows["segment_ids"],
        mesh=mesh,
        rules=rules,
    )
    return jax.lax.stop_gradient(heads.apply_scalar_head(params[heads.VALUE_HEAD], hidden))
