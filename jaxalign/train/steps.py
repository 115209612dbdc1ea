"""Pure training and evaluation steps.

A step takes plain pytrees — `state = {"step", "params", "opt_state"[, "loss_state"]}`, the frozen
reference params and a batch dict — and returns new ones. Gradient accumulation: every batch leaf
carries a leading micro-batch axis A; the step scans over it, sums the weighted losses and divides
by the total weight of the whole batch, so A micro-batches give exactly the gradient of one batch A
times larger.

Each training family supplies `objective(params, ref_params, micro[, loss_state]) ->
(weighted_loss_sum, weight_sum, metric_sums)`; every metric is a weighted sum that the step divides
by the total weight. Objectives whose loss carries running state (BCO's reward mean `delta`) have
an `initial_loss_state` attribute; the step passes `state["loss_state"]` in and updates it after
the whole batch (`update_loss_state`).

Families: `sft_objective` (token-mean NLL), `preference_objective` (any paired loss or mix, pair
batches), `unpaired_objective` (kto / bco / npo on single responses), and
`jaxalign.train.reward.reward_objective` (Bradley-Terry reward model).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxalign import kernels, losses, models

# Batch keys that describe the layout; every other key of a batch is a data field (a per-example
# or per-pair float array such as "margin", "beta_feature" or cached reference log-probs) that
# losses may take as an input of the same name.
LAYOUT_KEYS = (
    "tokens",
    "targets",
    "loss_mask",
    "positions",
    "segment_ids",
    "seq_index",
)
RETAIN_PREFIX = "retain/"


def as_loss(loss, loss_kwargs: dict | None = None) -> losses.Bound | losses.Mix:
    """A loss name (with hyperparameters) or an already built `Bound` / `Mix`."""
    if isinstance(loss, str):
        return losses.bind(loss, **(loss_kwargs or {}))
    return loss


def loss_inputs(loss: losses.Bound | losses.Mix) -> set[str]:
    """Every input name any term of `loss` reads (optional ones included, renames applied)."""
    terms = loss.terms if isinstance(loss, losses.Mix) else (loss,)
    return {t.rename.get(p, p) for t in terms for p in losses.inputs(t.name)}


def sequence_index(batch, seqs_per_group: int, num_groups: int):
    """(index int [R, T], S): the global sequence of every token, S for padding.

    A global batch is `num_groups` blocks of rows (one per host), each indexing its own
    `seqs_per_group` sequences; block g's sequences come out at [g * seqs_per_group, (g + 1) *
    seqs_per_group)."""
    rows = batch["loss_mask"].shape[0]
    group = (jnp.arange(rows) // (rows // num_groups))[:, None]
    total = seqs_per_group * num_groups
    seq_index = batch["seq_index"]
    return jnp.where(seq_index >= 0, seq_index + group * seqs_per_group, total), total


def sequence_sums(values, index, total: int):
    """[R, T] token values -> [S] per-sequence sums (padding dropped)."""
    return jax.ops.segment_sum(values.ravel(), index.ravel(), total + 1)[:total]


def response_ordinals(loss_mask, index, total: int):
    """1, 2, ... |y| on the counted tokens of each sequence, in order; 0 elsewhere: [R, T].

    A sequence is contiguous within its row, so with c the row's inclusive cumulative count of
    counted tokens, the ordinal is c - (c before the sequence's first token) = c - min_seq(c - m).
    """
    counts = jnp.cumsum(loss_mask, axis=1)
    before = jax.ops.segment_min((counts - loss_mask).ravel(), index.ravel(), total + 1)
    return (counts - before[index]) * loss_mask


def pair_min_lengths(lengths, num_groups: int):
    """[G * 2P] sequence lengths (block g: P chosen then P rejected) -> [G * 2P], each sequence's
    min(|y_w|, |y_l|) of its pair."""
    x = lengths.reshape(num_groups, 2, -1)
    return jnp.broadcast_to(x.min(axis=1, keepdims=True), x.shape).reshape(-1)


def prefix_mask(loss_mask, index, total: int, limit):
    """The counted tokens among the first `limit[s]` counted tokens of each sequence s: [R, T].

    For LD-DPO, `limit = pair_min_lengths(lengths)`: the common prefix of the pair's responses."""
    ordinals = response_ordinals(loss_mask, index, total)
    bound = jnp.concatenate([limit, jnp.zeros((1,), limit.dtype)])[index]
    return loss_mask * (ordinals <= bound)


def token_logps(model_config, params, batch, implementation=None):
    """Log-probs of the targets on counted tokens, 0 elsewhere: [R, T] (no [R, T, V] logits).

    Under a multi-device mesh set with `jax.set_mesh` (the training loop does), the kernel runs
    per shard inside `shard_map`: rows split over the batch axes (data, fsdp) as the batch is, the
    unembedding's vocabulary over `tensor`, partial logsumexps merged across it. A Pallas kernel
    cannot be partitioned by XLA, so this is also what keeps it sharded.
    """
    hidden = models.forward(
        model_config, params, batch["tokens"], batch["positions"], batch["segment_ids"]
    )
    unembedding = models.unembedding(model_config, params)
    mask = batch["loss_mask"] > 0
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernels.token_logprobs(
            hidden,
            unembedding,
            batch["targets"],
            mask=mask,
            implementation=implementation,
            softcap=model_config.final_logit_softcap,
        )
    return kernels.sharded_token_logprobs(
        hidden,
        unembedding,
        batch["targets"],
        mesh=mesh,
        vocab_axis="tensor",
        token_axes=("data", "fsdp"),
        mask=mask,
        implementation=implementation,
        softcap=model_config.final_logit_softcap,
    )


def sequence_logps(
    model_config, params, batch, seqs_per_group: int, num_groups: int, implementation=None
):
    """Sum of response-token log-probs and response lengths per sequence: ([S], [S]).

    Token log-probs come from the kernels (no [B, T, V] logits); `seq_index` maps every token to
    its sequence (-1 = padding), which makes the same code serve padded and packed rows (layout of
    the global batch: `sequence_index`).
    """
    index, total = sequence_index(batch, seqs_per_group, num_groups)
    mask = batch["loss_mask"]
    logps = token_logps(model_config, params, batch, implementation)
    return sequence_sums(logps * mask, index, total), sequence_sums(mask, index, total)


def split_pairs(x, num_groups: int):
    """[G * 2P] per-sequence values (block g: P chosen then P rejected) -> ([G*P], [G*P])."""
    x = x.reshape(num_groups, 2, -1)
    return x[:, 0].reshape(-1), x[:, 1].reshape(-1)


def _weighted(metrics: dict, weight):
    """Per-example metrics [B] -> weighted sums; scalar metrics are weighted by the batch weight."""
    total = weight.sum()
    return {k: (v * weight).sum() if v.ndim else v * total for k, v in metrics.items()}


def _data_fields(micro) -> dict:
    return {
        k: v for k, v in micro.items() if k not in LAYOUT_KEYS and not k.startswith(RETAIN_PREFIX)
    }


def _delta_state(loss) -> dict | None:
    """BCO's running reward mean, when a term of the loss takes `delta` (one such term at most)."""
    terms = loss.terms if isinstance(loss, losses.Mix) else (loss,)
    takers = [t for t in terms if "delta" in losses.inputs(t.name) and "delta" not in t.rename]
    if len(takers) > 1:
        raise ValueError(
            f"jaxalign: {len(takers)} loss terms take the running mean `delta` "
            f"({[t.name for t in takers]}); the trainer carries one"
        )
    return (
        {"delta": jnp.zeros((), jnp.float32), "delta_count": jnp.zeros((), jnp.float32)}
        if (takers)
        else None
    )


def update_loss_state(loss_state: dict | None, metrics: dict, weight):
    """Fold the batch into the running state: BCO's delta is the mean of all rewards seen so far,

        n' = n + w,   delta' = delta + (mean_batch - delta) w / n',

    with mean_batch = metrics[".../delta/batch_reward"] (already the weighted batch mean of the
    per-example rewards beta * s) and w the batch weight (real examples, or pairs: per pair the
    metric is the mean of its two rewards, so the mean over pairs is the mean over all rewards).
    The delta used at step t is thus the mean over the batches of steps < t (0 at the first step):
    TRL's BCO folds the current batch in first; lagging one batch keeps the step a single pass
    and independent of the micro-batch split."""
    if not loss_state:
        return loss_state
    key = next(k for k in metrics if k.endswith("delta/batch_reward"))
    count = loss_state["delta_count"] + weight
    delta = loss_state["delta"] + (metrics[key] - loss_state["delta"]) * weight / count
    return {"delta": delta, "delta_count": count}


def sft_objective(model_config, *, num_groups: int = 1, implementation=None) -> Callable:
    """Token-mean NLL of response tokens over the whole batch (prompt tokens masked)."""

    def objective(params, ref_params, micro, loss_state=None):
        del ref_params, loss_state
        per_group = micro["example_mask"].shape[0] // num_groups
        logps, lengths = sequence_logps(
            model_config, params, micro, per_group, num_groups, implementation
        )
        loss, metrics = losses.sft(logps, lengths)
        # Token-weighted: sum_i len_i * (-logp_i / len_i) / sum_i len_i = token-mean NLL.
        weight = lengths * micro["example_mask"]
        return (loss * weight).sum(), weight.sum(), _weighted(metrics, weight)

    return objective


def _paired_logps(model_config, params, micro, index, total, num_groups, prefix, impl):
    """{"{side}_logps"} and, with a prefix mask, {"{side}_prefix_logps"} for side chosen/rejected,
    as ([G*P] chosen, [G*P] rejected) tuples."""
    mask = micro["loss_mask"]
    logps = token_logps(model_config, params, micro, impl)
    out = {"logps": split_pairs(sequence_sums(logps * mask, index, total), num_groups)}
    if prefix is not None:
        out["prefix_logps"] = split_pairs(sequence_sums(logps * prefix, index, total), num_groups)
    return out


def preference_objective(
    model_config,
    loss,
    loss_kwargs: dict | None = None,
    *,
    num_groups: int = 1,
    implementation=None,
) -> Callable:
    """Any paired loss (a name with `loss_kwargs`, or a `losses.Bound` / `losses.Mix`) on pair
    batches (sequence i chosen, P + i rejected).

    Inputs the objective supplies, by name: `policy_{chosen,rejected}_logps`, `{chosen,rejected}
    _lengths`; `ref_*` (only when some term needs the reference: from the batch's cached
    `ref_chosen_logps` / `ref_rejected_logps` fields when present, else one reference forward);
    `*_prefix_logps` when a term takes them (LD-DPO: sums over the first min(|y_w|, |y_l|)
    response tokens of each side, `prefix_mask`); `delta` from `loss_state` (BCO); and every data
    field of the batch under its own name (e.g. `margin`, `beta_feature`, `chosen_margins`).
    """
    loss = as_loss(loss, loss_kwargs)
    accepted = loss_inputs(loss)
    needs_ref = loss.needs_reference
    wants_prefix = any(n.endswith("_prefix_logps") for n in accepted)

    def objective(params, ref_params, micro, loss_state=None):
        per_group = 2 * micro["example_mask"].shape[0] // num_groups
        index, total = sequence_index(micro, per_group, num_groups)
        mask = micro["loss_mask"]
        lengths = sequence_sums(mask, index, total)
        prefix = None
        if wants_prefix:
            prefix = prefix_mask(mask, index, total, pair_min_lengths(lengths, num_groups))
        inputs = _data_fields(micro)
        inputs["chosen_lengths"], inputs["rejected_lengths"] = split_pairs(lengths, num_groups)
        sides = {
            "policy": _paired_logps(
                model_config, params, micro, index, total, num_groups, prefix, implementation
            )
        }
        if needs_ref and "ref_chosen_logps" not in micro:
            ref = _paired_logps(
                model_config, ref_params, micro, index, total, num_groups, prefix, implementation
            )
            sides["ref"] = jax.lax.stop_gradient(ref)
        for who, values in sides.items():
            for what, (chosen, rejected) in values.items():
                inputs[f"{who}_chosen_{what}"] = chosen
                inputs[f"{who}_rejected_{what}"] = rejected
        if loss_state:
            inputs["delta"] = loss_state["delta"]
        per_pair, metrics = loss(inputs)
        metrics = dict(metrics)
        # Does the policy itself rank chosen above rejected? (With the reference equal to the
        # policy at step 0 the implicit-reward accuracy is 0 by ties; this one is not.)
        metrics["logps/accuracy"] = (
            inputs["policy_chosen_logps"] > inputs["policy_rejected_logps"]
        ).astype(jnp.float32)
        metrics["logps/chosen"] = inputs["policy_chosen_logps"]
        metrics["logps/rejected"] = inputs["policy_rejected_logps"]
        weight = micro["example_mask"]
        return (per_pair * weight).sum(), weight.sum(), _weighted(metrics, weight)

    objective.initial_loss_state = _delta_state(loss)
    return objective


def unpaired_objective(
    model_config,
    loss,
    loss_kwargs: dict | None = None,
    *,
    num_groups: int = 1,
    implementation=None,
) -> Callable:
    """kto / bco / npo (or a mix) on single responses: batch sequence i is example i.

    `kl_sequences_needed(loss)` (KTO) means the batch also carries, as sequence B + i, example i's
    prompt with another example's completion (`make_unpaired_pipeline(kl_sequences=True)`); their
    sums are the `kl_policy_logps` / `kl_ref_logps` inputs (the batch KL baseline z0). Inputs:
    `policy_logps`, `lengths`, `ref_logps` (when needed), `labels`, `example_mask`, `delta`
    (BCO's running mean from `loss_state`), the data fields, and with a retain set (batch keys
    "retain/<layout key>", an SFT batch of the same size) `retain_logps` / `retain_lengths`, e.g.
    for NPO+GD: mix (("npo", 1, {...}), ("sft", w, {}, {"policy_logps": "retain_logps",
    "lengths": "retain_lengths"})).

    Metrics: `logps/policy` (mean sequence log-prob) and, with labels, the mean implicit reward
    s = logp - ref of desirable and undesirable responses as weighted sums to be divided
    (`rewards/desirable_sum` / `labels/desirable`; `finalize_metrics` derives
    `rewards/desirable`, `rewards/undesirable` and `rewards/gap`).
    """
    loss = as_loss(loss, loss_kwargs)
    needs_ref = loss.needs_reference
    kl = kl_sequences_needed(loss)

    def objective(params, ref_params, micro, loss_state=None):
        n = micro["example_mask"].shape[0]
        per_group = (2 if kl else 1) * n // num_groups
        index, total = sequence_index(micro, per_group, num_groups)
        mask = micro["loss_mask"]

        def sums(p):
            values = sequence_sums(
                token_logps(model_config, p, micro, implementation) * mask, index, total
            )
            return split_pairs(values, num_groups) if kl else (values, None)

        inputs = _data_fields(micro)
        lengths = sequence_sums(mask, index, total)
        inputs["lengths"] = split_pairs(lengths, num_groups)[0] if kl else lengths
        inputs["policy_logps"], inputs["kl_policy_logps"] = sums(params)
        if needs_ref:
            ref, kl_ref = jax.lax.stop_gradient(sums(ref_params))
            inputs["ref_logps"], inputs["kl_ref_logps"] = ref, kl_ref
        if any(k.startswith(RETAIN_PREFIX) for k in micro):
            retain = {
                k[len(RETAIN_PREFIX) :]: v for k, v in micro.items() if k.startswith(RETAIN_PREFIX)
            }
            inputs["retain_logps"], inputs["retain_lengths"] = sequence_logps(
                model_config,
                params,
                retain,
                retain["example_mask"].shape[0] // num_groups,
                num_groups,
                implementation,
            )
        inputs = {k: v for k, v in inputs.items() if v is not None}
        if loss_state:
            inputs["delta"] = loss_state["delta"]
        per_example, metrics = loss(inputs)
        metrics = dict(metrics)
        metrics["logps/policy"] = inputs["policy_logps"]
        if "labels" in micro and needs_ref:
            s = jax.lax.stop_gradient(inputs["policy_logps"] - inputs["ref_logps"])
            good = micro["labels"]
            metrics["rewards/desirable_sum"] = s * good
            metrics["rewards/undesirable_sum"] = s * (1.0 - good)
            metrics["labels/desirable"] = good
        weight = micro["example_mask"]
        return (per_example * weight).sum(), weight.sum(), _weighted(metrics, weight)

    objective.initial_loss_state = _delta_state(loss)
    objective.kl_sequences = kl
    return objective


def kl_sequences_needed(loss) -> bool:
    """Whether the loss takes mismatched-pair log-probs (KTO's z0)."""
    return any(n.startswith("kl_") for n in loss_inputs(as_loss(loss)))


def finalize_metrics(metrics: dict) -> dict:
    """Ratios of averaged metrics: the mean implicit reward of desirable and undesirable
    responses and their gap (unpaired trainer), from the weighted sums of `unpaired_objective`."""
    if "labels/desirable" not in metrics:
        return metrics
    good = metrics["labels/desirable"]
    desirable = metrics["rewards/desirable_sum"] / jnp.maximum(good, 1e-9)
    undesirable = metrics["rewards/undesirable_sum"] / jnp.maximum(1.0 - good, 1e-9)
    return metrics | {
        "rewards/desirable": desirable,
        "rewards/undesirable": undesirable,
        "rewards/gap": desirable - undesirable,
    }


def _accumulate(objective, params, ref_params, batch, *, with_grad: bool, loss_state=None):
    """Scan the objective over the leading micro-batch axis, summing losses, weights, metrics and
    (optionally) gradients."""
    extra = {"loss_state": loss_state} if loss_state else {}

    def micro_step(carry, micro):
        if with_grad:
            (loss_sum, (weight, metrics)), grads = jax.value_and_grad(
                lambda p: _split(objective(p, ref_params, micro, **extra)), has_aux=True
            )(params)
        else:
            loss_sum, (weight, metrics) = _split(objective(params, ref_params, micro, **extra))
            grads = None
        new = (loss_sum, weight, metrics, grads)
        return (new if carry is None else jax.tree.map(jnp.add, carry, new)), None

    first = jax.tree.map(lambda x: x[0], batch)
    carry, _ = micro_step(None, first)
    rest = jax.tree.map(lambda x: x[1:], batch)
    if jax.tree.leaves(rest)[0].shape[0]:
        carry, _ = jax.lax.scan(micro_step, carry, rest)
    loss_sum, weight, metrics, grads = carry
    weight = jnp.maximum(weight, 1e-9)
    metrics = {k: v / weight for k, v in metrics.items()}
    grads = None if grads is None else jax.tree.map(lambda g: g / weight, grads)
    return loss_sum / weight, metrics, grads, weight


def _split(out):
    loss_sum, weight, metrics = out
    return loss_sum, (weight, metrics)


def make_train_step(objective: Callable, tx: optax.GradientTransformation, schedule):
    """`step(state, ref_params, batch) -> (state, metrics)`, pure; jit it with shardings.

    `state["loss_state"]` (when present) goes into every micro-batch of the step and is then
    updated from the whole batch's metrics (`update_loss_state`)."""

    def step(state, ref_params, batch):
        loss_state = state.get("loss_state")
        loss, metrics, grads, weight = _accumulate(
            objective, state["params"], ref_params, batch, with_grad=True, loss_state=loss_state
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        tokens = (batch["segment_ids"] > 0).sum()
        metrics = finalize_metrics(metrics) | {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state["step"]),
            "tokens": tokens.astype(jnp.float32),
        }
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        if loss_state is not None:
            new_state["loss_state"] = update_loss_state(loss_state, metrics, weight)
            metrics |= {f"loss_state/{k}": v for k, v in new_state["loss_state"].items()}
        return new_state, metrics

    return step


def make_eval_step(objective: Callable):
    """`eval_step(params, ref_params, batch, loss_state=None) -> (metric_sums, weight)`, summed
    over a split (`finalize_metrics` after dividing by the total weight)."""

    def eval_step(params, ref_params, batch, loss_state=None):
        loss, metrics, _, weight = _accumulate(
            objective, params, ref_params, batch, with_grad=False, loss_state=loss_state
        )
        return {k: v * weight for k, v in (metrics | {"loss": loss}).items()}, weight

    return eval_step
