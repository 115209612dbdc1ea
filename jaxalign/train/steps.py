"""Pure training and evaluation steps.

A step takes plain pytrees — `state = {"step", "params", "opt_state"}`, the frozen reference params
and a batch dict — and returns new ones. Gradient accumulation: every batch leaf carries a leading
micro-batch axis A; the step scans over it, sums the weighted losses and divides by the total weight
of the whole batch, so A micro-batches give exactly the gradient of one batch A times larger.

Each training family supplies `objective(params, ref_params, micro) -> (weighted_loss_sum,
weight_sum, metric_sums)`; every metric is a weighted sum that the step divides by the total weight.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxalign import kernels, losses, models


def sequence_logps(
    model_config, params, batch, seqs_per_group: int, num_groups: int, implementation=None
):
    """Sum of response-token log-probs and response lengths per sequence: ([S], [S]).

    Token log-probs come from the kernels (no [B, T, V] logits); `seq_index` maps every token to
    its sequence (-1 = padding), which makes the same code serve padded and packed rows. A global
    batch is `num_groups` blocks of rows (one per host), each indexing its own `seqs_per_group`
    sequences; block g's sequences come out at [g * seqs_per_group, (g + 1) * seqs_per_group).
    """
    hidden = models.forward(
        model_config, params, batch["tokens"], batch["positions"], batch["segment_ids"]
    )
    mask = batch["loss_mask"]
    token_logps = kernels.token_logprobs(
        hidden,
        models.unembedding(model_config, params),
        batch["targets"],
        mask=mask > 0,
        implementation=implementation,
    )
    rows = mask.shape[0]
    group = (jnp.arange(rows) // (rows // num_groups))[:, None]
    total = seqs_per_group * num_groups
    seq_index = batch["seq_index"]
    index = jnp.where(seq_index >= 0, seq_index + group * seqs_per_group, total).ravel()
    sums = jax.ops.segment_sum((token_logps * mask).ravel(), index, total + 1)[:total]
    lengths = jax.ops.segment_sum(mask.ravel(), index, total + 1)[:total]
    return sums, lengths


def split_pairs(x, num_groups: int):
    """[G * 2P] per-sequence values (block g: P chosen then P rejected) -> ([G*P], [G*P])."""
    x = x.reshape(num_groups, 2, -1)
    return x[:, 0].reshape(-1), x[:, 1].reshape(-1)


def _weighted(metrics: dict, weight):
    """Per-example metrics [B] -> weighted sums; scalar metrics are weighted by the batch weight."""
    total = weight.sum()
    return {k: (v * weight).sum() if v.ndim else v * total for k, v in metrics.items()}


def sft_objective(model_config, *, num_groups: int = 1, implementation=None) -> Callable:
    """Token-mean NLL of response tokens over the whole batch (prompt tokens masked)."""

    def objective(params, ref_params, micro):
        del ref_params
        per_group = micro["example_mask"].shape[0] // num_groups
        logps, lengths = sequence_logps(
            model_config, params, micro, per_group, num_groups, implementation
        )
        loss, metrics = losses.sft(logps, lengths)
        # Token-weighted: sum_i len_i * (-logp_i / len_i) / sum_i len_i = token-mean NLL.
        weight = lengths * micro["example_mask"]
        return (loss * weight).sum(), weight.sum(), _weighted(metrics, weight)

    return objective


def preference_objective(
    model_config, loss_name: str, loss_kwargs: dict, *, num_groups: int = 1, implementation=None
) -> Callable:
    """Any paired loss by name; the reference forward runs only when the loss needs it and the
    batch carries no cached `ref_logps`."""
    needs_ref = losses.needs_reference(loss_name)

    def objective(params, ref_params, micro):
        per_group = 2 * micro["example_mask"].shape[0] // num_groups
        logps, lengths = sequence_logps(
            model_config, params, micro, per_group, num_groups, implementation
        )
        inputs = {}
        inputs["policy_chosen_logps"], inputs["policy_rejected_logps"] = split_pairs(
            logps, num_groups
        )
        inputs["chosen_lengths"], inputs["rejected_lengths"] = split_pairs(lengths, num_groups)
        if needs_ref:
            if "ref_logps" in micro:
                ref = micro["ref_logps"]
            else:
                ref, _ = sequence_logps(
                    model_config, ref_params, micro, per_group, num_groups, implementation
                )
                ref = jax.lax.stop_gradient(ref)
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = split_pairs(ref, num_groups)
        loss, metrics = losses.call(loss_name, inputs, **loss_kwargs)
        metrics = dict(metrics)
        # Does the policy itself rank chosen above rejected? (With the reference equal to the
        # policy at step 0 the implicit-reward accuracy is 0 by ties; this one is not.)
        metrics["logps/accuracy"] = (
            inputs["policy_chosen_logps"] > inputs["policy_rejected_logps"]
        ).astype(jnp.float32)
        metrics["logps/chosen"] = inputs["policy_chosen_logps"]
        metrics["logps/rejected"] = inputs["policy_rejected_logps"]
        weight = micro["example_mask"]
        return (loss * weight).sum(), weight.sum(), _weighted(metrics, weight)

    return objective


def _accumulate(objective, params, ref_params, batch, *, with_grad: bool):
    """Scan the objective over the leading micro-batch axis, summing losses, weights, metrics and
    (optionally) gradients."""

    def micro_step(carry, micro):
        if with_grad:
            (loss_sum, (weight, metrics)), grads = jax.value_and_grad(
                lambda p: _split(objective(p, ref_params, micro)), has_aux=True
            )(params)
        else:
            loss_sum, (weight, metrics) = _split(objective(params, ref_params, micro))
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
    """`step(state, ref_params, batch) -> (state, metrics)`, pure; jit it with shardings."""

    def step(state, ref_params, batch):
        loss, metrics, grads, _ = _accumulate(
            objective, state["params"], ref_params, batch, with_grad=True
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        tokens = (batch["segment_ids"] > 0).sum()
        metrics = metrics | {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state["step"]),
            "tokens": tokens.astype(jnp.float32),
        }
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        return new_state, metrics

    return step


def make_eval_step(objective: Callable):
    """`eval_step(params, ref_params, batch) -> (metric_sums, weight)`, summed over a split."""

    def eval_step(params, ref_params, batch):
        loss, metrics, _, weight = _accumulate(
            objective, params, ref_params, batch, with_grad=False
        )
        return {k: v * weight for k, v in (metrics | {"loss": loss}).items()}, weight

    return eval_step
