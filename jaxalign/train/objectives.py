"""What a trainer family's step computes: the `Objective` record and the offline objectives.

An objective maps one micro-batch to weighted sums,

    fn(params, ref_params, micro, loss_state) -> (weighted_loss_sum, weight_sum, metric_sums),

and the step (`jaxalign.train.steps`) sums them over micro-batches and divides by the total weight,
so any split into micro-batches gives the gradient of the whole batch. Every metric is a weighted
sum divided the same way.

Objectives: `sft_objective` (token-mean NLL), `paired_objective` (any paired loss or mix on pair
batches), `unpaired_objective` (kto / bco / npo on single responses), `judgment_objective` (CUT
on a response read with and without its judgment) and
`jaxalign.train.reward.reward_objective` (Bradley-Terry reward model).

Sequences. A batch holds B sequences in R rows (layout: `jaxalign.data.layout`); `seq_index`
maps every token to its sequence, which makes the same code serve padded and packed rows. A global
batch is `num_groups` blocks of rows, one per host, each indexing its own sequences
(`sequence_index`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxalign import kernels, losses, models
from jaxalign.data import layout
from jaxalign.data.layout import BatchSpec


@dataclasses.dataclass(frozen=True)
class Objective:
    """Everything the steps, loops, plans and the reference cache need to know about an objective.

    fn: (params, ref_params, micro, loss_state) -> (loss_sum, weight, metric_sums).
    batch: what its batches hold (`jaxalign.data.layout.BatchSpec`).
    needs_ref: whether `fn` reads `ref_params` (the run then holds frozen reference weights).
    initial_loss_state: running loss state carried in the train state (BCO's delta), or None.
    teacher: a second, frozen model `fn` reads as `ref_params` in place of the reference
      (distillation; `needs_ref` is then True), or None.
    teacher_ref: the teacher's own reference (ADPA's advantage log p_T - log p_Tref), or None;
      with it `ref_params` is {"ref": the student's reference, "teacher", "teacher_ref"}.
    """

    fn: Callable
    batch: BatchSpec
    needs_ref: bool = False
    initial_loss_state: dict | None = None
    teacher: Teacher | None = None
    teacher_ref: Teacher | None = None


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A distillation teacher: its architecture and where its weights come from ("" = the random
    init of seed + 1, "checkpoint:DIR", "hf:DIR")."""

    model_config: models.ModelConfig
    source: str


def as_loss(loss, loss_kwargs: dict | None = None) -> losses.Bound | losses.Mix:
    """A loss name (with hyperparameters) or an already built `Bound` / `Mix`."""
    if isinstance(loss, str):
        return losses.bind(loss, **(loss_kwargs or {}))
    return loss


def loss_inputs(loss: losses.Bound | losses.Mix) -> set[str]:
    """Every input name any term of `loss` reads (optional ones included, renames applied)."""
    terms = loss.terms if isinstance(loss, losses.Mix) else (loss,)
    return {t.rename.get(p, p) for t in terms for p in losses.inputs(t.name)}


def kl_sequences_needed(loss) -> bool:
    """Whether the loss takes mismatched-pair log-probs (KTO's z0)."""
    return any(n.startswith("kl_") for n in loss_inputs(as_loss(loss)))


def sequence_index(batch, seqs_per_group: int, num_groups: int):
    """(index int [R, T], B): the global sequence of every token, B for padding.

    A global batch is `num_groups` blocks of rows (one per host), each indexing its own
    `seqs_per_group` sequences; block g's sequences come out at [g * seqs_per_group, (g + 1) *
    seqs_per_group)."""
    rows = batch["loss_mask"].shape[0]
    group = (jnp.arange(rows) // (rows // num_groups))[:, None]
    total = seqs_per_group * num_groups
    seq_index = batch["seq_index"]
    return jnp.where(seq_index >= 0, seq_index + group * seqs_per_group, total), total


def sequence_sums(values, index, total: int):
    """[R, T] token values -> [B] per-sequence sums (padding dropped)."""
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


def token_logps(
    model_config, params, batch, *, mesh: Mesh | None = None, rules=None, implementation=None
):
    """Log-probs of the targets on counted tokens, 0 elsewhere: [R, T] (no [R, T, V] logits).

    `rules` (`jaxalign.sharding.ShardingRules`) annotate the model's activations. On a
    multi-device `mesh` the kernel runs per shard inside `shard_map`: rows split over the
    batch axes (data, fsdp) as the batch is, the unembedding's vocabulary over `tensor`, partial
    logsumexps merged across it. A Pallas kernel cannot be partitioned by XLA, so this is also
    what keeps it sharded.
    """
    hidden = models.forward(
        model_config,
        params,
        batch["tokens"],
        batch["positions"],
        batch["segment_ids"],
        mesh=mesh,
        rules=rules,
    )
    unembedding = models.unembedding(model_config, params)
    mask = batch["loss_mask"] > 0
    if mesh is None or mesh.size == 1:
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
    model_config,
    params,
    batch,
    seqs_per_group: int,
    num_groups: int,
    *,
    mesh=None,
    rules=None,
    impl=None,
):
    """Sum of response-token log-probs and response lengths per sequence: ([B], [B])."""
    index, total = sequence_index(batch, seqs_per_group, num_groups)
    mask = batch["loss_mask"]
    logps = token_logps(model_config, params, batch, mesh=mesh, rules=rules, implementation=impl)
    return sequence_sums(logps * mask, index, total), sequence_sums(mask, index, total)


def split_pairs(x, num_groups: int):
    """[G * 2P, ...] per-sequence values (block g: P chosen then P rejected) -> ([G*P, ...],
    [G*P, ...])."""
    rest = x.shape[1:]
    x = x.reshape(num_groups, 2, -1, *rest)
    return x[:, 0].reshape(-1, *rest), x[:, 1].reshape(-1, *rest)


def split_sides(x, num_groups: int, sides: int):
    """[G * kP] per-sequence values (block g: P of each side in turn) -> k arrays [G*P]."""
    x = x.reshape(num_groups, sides, -1)
    return tuple(x[:, k].reshape(-1) for k in range(sides))


def paired_logps(
    model_config,
    params,
    micro,
    num_groups: int,
    *,
    with_prefix,
    sides: int = 2,
    mesh=None,
    rules=None,
    impl=None,
):
    """Per pair ([G*P], [G*P]) chosen and rejected sums of a pair batch (and the chosen response
    after the contrast prompt with `sides=3`): {"logps": ...} and, with `with_prefix`,
    {"prefix_logps": ...} over the first min(|y_w|, |y_l|) response tokens of each side (LD-DPO,
    `prefix_mask`). Also returns the per-side lengths under "lengths"."""
    per_group = sides * micro["example_mask"].shape[0] // num_groups
    index, total = sequence_index(micro, per_group, num_groups)
    mask = micro["loss_mask"]
    lengths = sequence_sums(mask, index, total)
    logps = token_logps(model_config, params, micro, mesh=mesh, rules=rules, implementation=impl)
    out = {
        "lengths": split_sides(lengths, num_groups, sides),
        "logps": split_sides(sequence_sums(logps * mask, index, total), num_groups, sides),
    }
    if with_prefix:
        prefix = prefix_mask(mask, index, total, pair_min_lengths(lengths, num_groups))
        out["prefix_logps"] = split_pairs(sequence_sums(logps * prefix, index, total), num_groups)
    return out


def response_group_logps(
    model_config,
    params,
    micro,
    num_groups: int,
    counts: dict[str, int],
    *,
    mesh=None,
    rules=None,
    impl=None,
):
    """Sums and lengths of a batch of S = sum(counts) responses per example (block g: every
    example's response 0, then every example's response 1, ...), split into the named runs of
    `counts` in order: {name: ([G*E, n], [G*E, n]) as (logps, lengths)}. D2O's negatives batches
    are {"rejected": 1, "samples": K}, AFT's ranked batches {"positive": P, "negative": N}."""
    S = sum(counts.values())
    per_group = S * micro["example_mask"].shape[0] // num_groups
    index, total = sequence_index(micro, per_group, num_groups)
    mask = micro["loss_mask"]
    logps = token_logps(model_config, params, micro, mesh=mesh, rules=rules, implementation=impl)

    def columns(x):  # [G * S * E] -> [G*E, S]
        return x.reshape(num_groups, S, -1).transpose(0, 2, 1).reshape(-1, S)

    sums = columns(sequence_sums(logps * mask, index, total))
    lengths = columns(sequence_sums(mask, index, total))
    out, start = {}, 0
    for name, n in counts.items():
        out[name] = (sums[:, start : start + n], lengths[:, start : start + n])
        start += n
    return out


def weighted(metrics: dict, weight):
    """Per-example metrics [E] -> weighted sums; scalar metrics are weighted by the batch weight."""
    total = weight.sum()
    return {k: (v * weight).sum() if v.ndim else v * total for k, v in metrics.items()}


def delta_state(loss) -> dict | None:
    """BCO's running reward mean, when a term of the loss takes `delta` (one such term at most)."""
    terms = loss.terms if isinstance(loss, losses.Mix) else (loss,)
    takers = [t for t in terms if "delta" in losses.inputs(t.name) and "delta" not in t.rename]
    if len(takers) > 1:
        raise ValueError(
            f"{len(takers)} loss terms take the running mean `delta` "
            f"({[t.name for t in takers]}); the trainer carries one"
        )
    if not takers:
        return None
    return {"delta": jnp.zeros((), jnp.float32), "delta_count": jnp.zeros((), jnp.float32)}


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


def finalize_metrics(metrics: dict) -> dict:
    """Ratios of averaged metrics: the mean implicit reward of desirable and undesirable
    responses and their gap (unpaired objective), from its weighted sums."""
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


def sft_objective(
    model_config, *, num_groups: int = 1, mesh=None, rules=None, implementation=None, fields=()
) -> Objective:
    """Token-mean NLL of response tokens over the whole batch (prompt tokens masked)."""

    def fn(params, ref_params, micro, loss_state=None):
        del ref_params, loss_state
        per_group = micro["example_mask"].shape[0] // num_groups
        logps, lengths = sequence_logps(
            model_config,
            params,
            micro,
            per_group,
            num_groups,
            mesh=mesh,
            rules=rules,
            impl=implementation,
        )
        loss, metrics = losses.sft(logps, lengths)
        # Token-weighted: sum_i len_i * (-logp_i / len_i) / sum_i len_i = token-mean NLL.
        weight = lengths * micro["example_mask"]
        return (loss * weight).sum(), weight.sum(), weighted(metrics, weight)

    return Objective(fn, BatchSpec("sft", fields=tuple(fields)))


def paired_objective(
    model_config,
    loss,
    loss_kwargs: dict | None = None,
    *,
    num_groups: int = 1,
    mesh=None,
    rules=None,
    implementation=None,
    fields=(),
    num_samples: int = 0,
    num_correct: int = 0,
    num_incorrect: int = 0,
) -> Objective:
    """Any paired loss (a name with `loss_kwargs`, or a `losses.Bound` / `losses.Mix`) on pair
    batches (sequence i chosen, P + i rejected).

    A loss that takes `policy_samples_logps` (D2O) reads negatives batches instead (`num_samples`
    K self-generated responses and one human negative per record; `response_group_logps`) and gets
    `{policy,ref}_rejected_logps` [P], `{policy,ref}_samples_logps` [P, K], `rejected_lengths`,
    `samples_lengths`; the reference is computed (such batches have no reference cache).
    Likewise a loss that takes `policy_positive_logps` (AFT) reads ranked batches (`num_correct`
    P correct and `num_incorrect` N incorrect responses per record; `response_group_logps`) and gets
    `{policy,ref}_{positive,negative}_logps` [E, P] / [E, N], `{positive,negative}_lengths`.

    Inputs the objective supplies, by name: `policy_{chosen,rejected}_logps`, `{chosen,rejected}
    _lengths`; `ref_*` (only when some term needs the reference: from the batch's cached
    `ref_chosen_logps` / `ref_rejected_logps` fields when `fields` holds the reference cache's
    `CACHE_FIELDS`, else one reference forward); `*_prefix_logps` when a term takes them (LD-DPO:
    sums over the first min(|y_w|, |y_l|) response tokens of each side); `delta` from `loss_state`
    (BCO); and every data field of the batch under its own name (e.g. `margin`, `beta_feature`,
    `chosen_margins`). When a term takes `policy_contrast_logps` (Re-Align's `realign`) the
    batches are contrast pairs (records "contrast") and `{policy,ref}_contrast_logps`,
    `contrast_lengths` are the chosen response's after the contrast prompt.
    """
    loss = as_loss(loss, loss_kwargs)
    names = loss_inputs(loss)
    with_prefix = any(n.endswith("_prefix_logps") for n in names)
    cached = set(layout.CACHE_FIELDS) <= set(fields)
    contrast = "policy_contrast_logps" in names
    if contrast and (with_prefix or cached):
        raise ValueError(
            "the contrast term (policy_contrast_logps) takes no prefix log-probs and no cached "
            "reference log-probs (data.ref_logps)"
        )
    kinds = ("chosen", "rejected", "contrast") if contrast else ("chosen", "rejected")
    needs_ref = loss.needs_reference and not cached
    sides = {"policy": False, "ref": True} if needs_ref else {"policy": False}
    if "policy_samples_logps" in names:
        return _negatives_objective(
            model_config, loss, num_groups, num_samples, cached, fields, mesh, rules, implementation
        )
    if "policy_positive_logps" in names:
        return _ranked_objective(
            model_config,
            loss,
            num_groups,
            (num_correct, num_incorrect),
            cached,
            fields,
            dict(mesh=mesh, rules=rules, impl=implementation),
        )
    kw = dict(
        with_prefix=with_prefix, sides=len(kinds), mesh=mesh, rules=rules, impl=implementation
    )

    def fn(params, ref_params, micro, loss_state=None):
        inputs = layout.data_fields(micro)
        for who, frozen in sides.items():
            values = paired_logps(
                model_config, ref_params if frozen else params, micro, num_groups, **kw
            )
            lengths = values.pop("lengths")
            if frozen:
                values = jax.lax.stop_gradient(values)
            for what, per_side in values.items():
                for kind, value in zip(kinds, per_side, strict=True):
                    inputs[f"{who}_{kind}_{what}"] = value
        for kind, value in zip(kinds, lengths, strict=True):
            inputs[f"{kind}_lengths"] = value
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
        return (per_pair * weight).sum(), weight.sum(), weighted(metrics, weight)

    batch = BatchSpec("contrast" if contrast else "pair", fields=tuple(fields))
    return Objective(fn, batch, needs_ref, delta_state(loss))


def _negatives_objective(
    model_config, loss, num_groups, num_samples, cached, fields, mesh, rules, impl
) -> Objective:
    """`paired_objective` of a loss on negatives batches (D2O)."""
    if num_samples < 1:
        raise ValueError(f"data.num_samples={num_samples}: D2O needs K >= 1 samples per record")
    if cached:
        raise ValueError(
            "negatives records (D2O) have no reference cache; drop data.ref_logps (the "
            "reference forward runs in the step)"
        )
    kw = dict(mesh=mesh, rules=rules, impl=impl)

    def fn(params, ref_params, micro, loss_state=None):
        del loss_state
        inputs = layout.data_fields(micro)
        for who, p in (("policy", params), ("ref", ref_params)):
            values = response_group_logps(
                model_config, p, micro, num_groups, {"rejected": 1, "samples": num_samples}, **kw
            )
            rejected, rejected_lengths = values["rejected"]
            values["rejected"] = (rejected[:, 0], rejected_lengths[:, 0])
            if who == "ref":
                values = jax.lax.stop_gradient(values)
            for side, (logps, lengths) in values.items():
                inputs[f"{who}_{side}_logps"] = logps
                inputs[f"{side}_lengths"] = lengths
        per_example, metrics = loss(inputs)
        metrics = dict(metrics)
        samples = inputs["policy_samples_logps"].mean(axis=-1)
        # Does the policy itself rank its own samples (on average) above the human negative?
        metrics["logps/accuracy"] = (samples > inputs["policy_rejected_logps"]).astype(jnp.float32)
        metrics["logps/samples"] = samples
        metrics["logps/rejected"] = inputs["policy_rejected_logps"]
        weight = micro["example_mask"]
        return (per_example * weight).sum(), weight.sum(), weighted(metrics, weight)

    batch = BatchSpec("negatives", fields=tuple(fields), num_samples=num_samples)
    return Objective(fn, batch, needs_ref=True)


def _ranked_objective(
    model_config, loss, num_groups, counts, cached, fields, placement
) -> Objective:
    """`paired_objective` of a loss on ranked batches (AFT): one policy and one reference forward
    over the P + N responses of each record."""
    num_correct, num_incorrect = counts
    if num_correct < 1 or num_incorrect < 1:
        raise ValueError(
            f"data.num_correct={num_correct}, data.num_incorrect={num_incorrect}: AFT needs at "
            "least one correct and one incorrect response per record"
        )
    if cached:
        raise ValueError(
            "ranked records (AFT) have no reference cache; drop data.ref_logps (the reference "
            "forward runs in the step)"
        )
    needs_ref = loss.needs_reference
    sides = {"policy": False, "ref": True} if needs_ref else {"policy": False}

    def fn(params, ref_params, micro, loss_state=None):
        del loss_state
        inputs = layout.data_fields(micro)
        for who, frozen in sides.items():
            values = response_group_logps(
                model_config,
                ref_params if frozen else params,
                micro,
                num_groups,
                {"positive": num_correct, "negative": num_incorrect},
                **placement,
            )
            if frozen:
                values = jax.lax.stop_gradient(values)
            for side, (logps, lengths) in values.items():
                inputs[f"{who}_{side}_logps"] = logps
                inputs[f"{side}_lengths"] = lengths
        per_example, metrics = loss(inputs)
        weight = micro["example_mask"]
        return (per_example * weight).sum(), weight.sum(), weighted(dict(metrics), weight)

    batch = BatchSpec(
        "ranked", fields=tuple(fields), num_correct=num_correct, num_incorrect=num_incorrect
    )
    return Objective(fn, batch, needs_ref)


def unpaired_objective(
    model_config,
    loss,
    loss_kwargs: dict | None = None,
    *,
    num_groups: int = 1,
    mesh=None,
    rules=None,
    implementation=None,
    fields=(),
    retain: bool = False,
) -> Objective:
    """kto / bco / npo (or a mix) on single responses: batch sequence i is example i.

    A loss that takes `labels` reads `{prompt, completion, label}` records; one without (NPO)
    reads SFT records (the forget set). `kl_sequences_needed(loss)` (KTO) means the batch also
    carries, as sequence E + i, example i's prompt with another example's completion; their sums
    are the `kl_policy_logps` / `kl_ref_logps` inputs (the batch KL baseline z0). Inputs:
    `policy_logps`, `lengths`, `ref_logps` (when needed: one reference forward, or the batch's
    cached `ref_logps` field when `fields` holds `SINGLE_CACHE_FIELDS`), `labels`,
    `example_mask`, `delta` (BCO's running mean from `loss_state`), the data fields, and with a
    retain set (`retain=True`: an SFT batch under "retain/<key>") `retain_logps` /
    `retain_lengths`, e.g. for NPO+GD: mix (("npo", 1, {...}), ("sft", w, {}, {"policy_logps":
    "retain_logps", "lengths": "retain_lengths"})).

    Metrics: `logps/policy` (mean sequence log-prob) and, with labels, the mean implicit reward
    s = logp - ref of desirable and undesirable responses as weighted sums to be divided
    (`rewards/desirable_sum` / `labels/desirable`; `finalize_metrics` derives
    `rewards/desirable`, `rewards/undesirable` and `rewards/gap`).
    """
    loss = as_loss(loss, loss_kwargs)
    kl = kl_sequences_needed(loss)
    cached = set(layout.SINGLE_CACHE_FIELDS) <= set(fields)
    if cached and kl:
        raise ValueError(
            "cached reference log-probs (data.ref_logps) hold no KL sequences; "
            f"{sorted(loss_inputs(loss))} needs the reference's mismatched-pair log-probs"
        )
    needs_ref = loss.needs_reference and not cached
    labelled = "labels" in loss_inputs(loss)
    impl = implementation

    def fn(params, ref_params, micro, loss_state=None):
        n = micro["example_mask"].shape[0]
        per_group = (2 if kl else 1) * n // num_groups
        index, total = sequence_index(micro, per_group, num_groups)
        mask = micro["loss_mask"]

        def sums(p):
            logps = token_logps(model_config, p, micro, mesh=mesh, rules=rules, implementation=impl)
            values = sequence_sums(logps * mask, index, total)
            return split_pairs(values, num_groups) if kl else (values, None)

        inputs = layout.data_fields(micro)
        lengths = sequence_sums(mask, index, total)
        inputs["lengths"] = split_pairs(lengths, num_groups)[0] if kl else lengths
        inputs["policy_logps"], inputs["kl_policy_logps"] = sums(params)
        if needs_ref:
            ref, kl_ref = jax.lax.stop_gradient(sums(ref_params))
            inputs["ref_logps"], inputs["kl_ref_logps"] = ref, kl_ref
        if retain:
            held = layout.retain_batch(micro)
            inputs["retain_logps"], inputs["retain_lengths"] = sequence_logps(
                model_config,
                params,
                held,
                held["example_mask"].shape[0] // num_groups,
                num_groups,
                mesh=mesh,
                rules=rules,
                impl=impl,
            )
        inputs = {k: v for k, v in inputs.items() if v is not None}
        if loss_state:
            inputs["delta"] = loss_state["delta"]
        per_example, metrics = loss(inputs)
        metrics = dict(metrics)
        metrics["logps/policy"] = inputs["policy_logps"]
        if labelled and "ref_logps" in inputs:
            s = jax.lax.stop_gradient(inputs["policy_logps"] - inputs["ref_logps"])
            good = micro["labels"]
            metrics["rewards/desirable_sum"] = s * good
            metrics["rewards/undesirable_sum"] = s * (1.0 - good)
            metrics["labels/desirable"] = good
        weight = micro["example_mask"]
        return (per_example * weight).sum(), weight.sum(), weighted(metrics, weight)

    records = "unpaired" if labelled else "sft"
    batch = BatchSpec(records, kl_sequences=kl, fields=tuple(fields), retain=retain)
    return Objective(fn, batch, needs_ref, delta_state(loss))


def response_tokens(values, loss_mask, index, total: int):
    """[R, T] values on counted tokens -> [B, T] per sequence, its k-th response token in column
    k - 1 and 0 after its end (padded or packed rows alike)."""
    T = loss_mask.shape[1]
    ordinals = response_ordinals(loss_mask, index, total).astype(jnp.int32)
    column = jnp.where(loss_mask > 0, ordinals - 1, T)
    out = jnp.zeros((total + 1, T + 1), values.dtype).at[index, column].add(values * loss_mask)
    return out[:total, :T]


JUDGMENT_INPUTS = ("policy_token_logps", "judged_token_logps", "response_mask")


def judgment_objective(
    model_config,
    loss,
    loss_kwargs: dict | None = None,
    *,
    num_groups: int = 1,
    mesh=None,
    rules=None,
    implementation=None,
    fields=(),
) -> Objective:
    """CUT (`jaxalign.losses.cut`) on judgment batches: sequence i is example i's response y
    after the prompt x, sequence E + i the same response tokens after x with the judgment j.

    One forward of the policy over both: the token log-probs of the first are
    `policy_token_logps` [E, T] (differentiated), of the second `judged_token_logps` (under
    stop-gradient: p(y_t | x, j, y_<t) only decides which tokens are flagged), aligned by
    response position (`response_tokens`), with `response_mask`; the data fields by name.
    Examples weigh by their response length, so the batch loss is a token mean as in SFT.
    Metrics: the loss's, and `nll/judged` (token-mean NLL with the judgment).
    """
    loss = as_loss(loss, loss_kwargs)
    missing = set(loss.required_inputs) - set(JUDGMENT_INPUTS) - set(fields)
    if missing:
        raise ValueError(
            f"judgment batches supply {', '.join(JUDGMENT_INPUTS)}; the loss also needs "
            f"{sorted(missing)} (use the `cut` loss)"
        )

    def fn(params, ref_params, micro, loss_state=None):
        del ref_params, loss_state
        per_group = 2 * micro["example_mask"].shape[0] // num_groups
        index, total = sequence_index(micro, per_group, num_groups)
        mask = micro["loss_mask"]
        logps = token_logps(
            model_config, params, micro, mesh=mesh, rules=rules, implementation=implementation
        )
        plain, judged = split_pairs(response_tokens(logps, mask, index, total), num_groups)
        response_mask, _ = split_pairs(response_tokens(mask, mask, index, total), num_groups)
        inputs = layout.data_fields(micro)
        inputs["policy_token_logps"] = plain
        inputs["judged_token_logps"] = jax.lax.stop_gradient(judged)
        inputs["response_mask"] = response_mask
        per_example, metrics = loss(inputs)
        lengths = response_mask.sum(-1)
        metrics = dict(metrics)
        metrics["nll/judged"] = jax.lax.stop_gradient(
            -(judged * response_mask).sum(-1) / jnp.maximum(lengths, 1.0)
        )
        weight = lengths * micro["example_mask"]
        return (per_example * weight).sum(), weight.sum(), weighted(metrics, weight)

    return Objective(fn, BatchSpec("judgment", fields=tuple(fields)))
