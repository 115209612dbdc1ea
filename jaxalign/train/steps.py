"""Pure training and evaluation steps for any `Objective`.

A step takes plain pytrees — `state = {"step", "params", "opt_state"[, "loss_state"]}`, the frozen
reference params and a batch dict — and returns new ones. Gradient accumulation: every batch leaf
carries a leading micro-batch axis A; the step scans the objective over it, sums the weighted
losses, metrics and gradients and divides by the total weight of the whole batch, so A
micro-batches give exactly the gradient of one batch A times larger. The model is traced once
whatever A is: the scan starts from zeros shaped by `jax.eval_shape` of one micro-batch.

Objectives whose loss carries running state (BCO's reward mean `delta`) get `state["loss_state"]`
in every micro-batch; it is updated after the whole batch (`objectives.update_loss_state`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxalign import models
from jaxalign.train.objectives import Objective, finalize_metrics, update_loss_state


def accumulate(
    objective: Objective,
    params,
    ref_params,
    batch,
    *,
    with_grad: bool,
    loss_state,
    policy=None,
):
    """Sum the objective's (loss, weight, metrics[, gradients]) over the leading micro-batch axis
    and divide by the total weight: (loss, metrics, grads or None, weight). `policy(params, i)`
    gives the params the objective runs for micro-batch i (default: `params`); gradients are
    w.r.t. `params`."""
    policy = policy or (lambda p, i: p)

    def one(micro, i):
        def split(p):
            loss_sum, weight, metrics = objective.fn(policy(p, i), ref_params, micro, loss_state)
            return loss_sum, (weight, metrics)

        if not with_grad:
            loss_sum, (weight, metrics) = split(params)
            return loss_sum, weight, metrics, None
        (loss_sum, (weight, metrics)), grads = jax.value_and_grad(split, has_aux=True)(params)
        return loss_sum, weight, metrics, grads

    A = jax.tree.leaves(batch)[0].shape[0]
    if A == 1:
        totals = one(jax.tree.map(lambda x: x[0], batch), 0)
    else:
        shapes = jax.eval_shape(one, jax.tree.map(lambda x: x[0], batch), 0)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        totals, _ = jax.lax.scan(
            lambda carry, xs: (jax.tree.map(jnp.add, carry, one(*xs)), None),
            zeros,
            (batch, jnp.arange(A)),
        )
    loss_sum, weight, metrics, grads = totals
    weight = jnp.maximum(weight, 1e-9)
    metrics = {k: v / weight for k, v in metrics.items()}
    grads = None if grads is None else jax.tree.map(lambda g: g / weight, grads)
    return loss_sum / weight, metrics, grads, weight


def adapter_policy(base, dropout_key=None):
    """LoRA: `policy(adapters, i)` for `accumulate`: the frozen `base` with the trained adapters
    (and heads) attached; with `dropout_key` (already folded with the step), micro-batch i's
    adapter dropout uses fold_in(dropout_key, i)."""

    def policy(params, i):
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
        heads = {k: v for k, v in params.items() if k != models.ADAPTERS}
        return models.attach(base | heads, params[models.ADAPTERS], key)

    return policy


def make_train_step(
    objective: Objective,
    tx: optax.GradientTransformation,
    schedule,
    *,
    lora=False,
    dropout_key=None,
):
    """`step(state, ref_params, batch) -> (state, metrics)`, pure; jit it with shardings.

    With `lora`, `state["params"]` holds the LoRA adapters (and a family's head) and `ref_params`
    the frozen base weights: the objective's policy is the base with the adapters attached
    (`adapter_policy`), its reference the base alone. `dropout_key`: the adapters' dropout
    stream, folded with the step number (a fresh mask every update)."""

    def step(state, ref_params, batch):
        loss_state = state.get("loss_state")
        policy = None
        if lora:
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, state["step"])
            policy = adapter_policy(ref_params, key)
        loss, metrics, grads, weight = accumulate(
            objective,
            state["params"],
            ref_params,
            batch,
            with_grad=True,
            loss_state=loss_state,
            policy=policy,
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
        if isinstance(opt_state, optax.ApplyIfFiniteState):  # optimizer.skip_nonfinite
            metrics["updates_skipped"] = opt_state.total_notfinite
            metrics["nonfinite_streak"] = opt_state.notfinite_count
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        if loss_state is not None:
            new_state["loss_state"] = update_loss_state(loss_state, metrics, weight)
            metrics |= {f"loss_state/{k}": v for k, v in new_state["loss_state"].items()}
        return new_state, metrics

    return step


def make_eval_step(objective: Objective, *, lora=False):
    """`eval_step(params, ref_params, batch, loss_state=None) -> (metric_sums, weight)`, summed
    over a split (`finalize_metrics` after dividing by the total weight). `lora`: as for
    `make_train_step`, without dropout."""

    def eval_step(params, ref_params, batch, loss_state=None):
        policy = adapter_policy(ref_params) if lora else None
        loss, metrics, _, weight = accumulate(
            objective,
            params,
            ref_params,
            batch,
            with_grad=False,
            loss_state=loss_state,
            policy=policy,
        )
        return {k: v * weight for k, v in (metrics | {"loss": loss}).items()}, weight

    return eval_step
