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

from jaxalign.train.objectives import Objective, finalize_metrics, update_loss_state


def accumulate(objective: Objective, params, ref_params, batch, *, with_grad: bool, loss_state):
    """Sum the objective's (loss, weight, metrics[, gradients]) over the leading micro-batch axis
    and divide by the total weight: (loss, metrics, grads or None, weight)."""

    def one(micro):
        def split(p):
            loss_sum, weight, metrics = objective.fn(p, ref_params, micro, loss_state)
            return loss_sum, (weight, metrics)

        if not with_grad:
            loss_sum, (weight, metrics) = split(params)
            return loss_sum, weight, metrics, None
        (loss_sum, (weight, metrics)), grads = jax.value_and_grad(split, has_aux=True)(params)
        return loss_sum, weight, metrics, grads

    if jax.tree.leaves(batch)[0].shape[0] == 1:
        totals = one(jax.tree.map(lambda x: x[0], batch))
    else:
        shapes = jax.eval_shape(one, jax.tree.map(lambda x: x[0], batch))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        totals, _ = jax.lax.scan(
            lambda carry, micro: (jax.tree.map(jnp.add, carry, one(micro)), None), zeros, batch
        )
    loss_sum, weight, metrics, grads = totals
    weight = jnp.maximum(weight, 1e-9)
    metrics = {k: v / weight for k, v in metrics.items()}
    grads = None if grads is None else jax.tree.map(lambda g: g / weight, grads)
    return loss_sum / weight, metrics, grads, weight


def make_train_step(objective: Objective, tx: optax.GradientTransformation, schedule):
    """`step(state, ref_params, batch) -> (state, metrics)`, pure; jit it with shardings."""

    def step(state, ref_params, batch):
        loss_state = state.get("loss_state")
        loss, metrics, grads, weight = accumulate(
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
        if isinstance(opt_state, optax.ApplyIfFiniteState):  # optimizer.skip_nonfinite
            metrics["updates_skipped"] = opt_state.total_notfinite
            metrics["nonfinite_streak"] = opt_state.notfinite_count
        # Entries the step does not own (an online loop's "rl" state) pass through unchanged.
        new_state = state | {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        if loss_state is not None:
            new_state["loss_state"] = update_loss_state(loss_state, metrics, weight)
            metrics |= {f"loss_state/{k}": v for k, v in new_state["loss_state"].items()}
        return new_state, metrics

    return step


def make_eval_step(objective: Objective):
    """`eval_step(params, ref_params, batch, loss_state=None) -> (metric_sums, weight)`, summed
    over a split (`finalize_metrics` after dividing by the total weight)."""

    def eval_step(params, ref_params, batch, loss_state=None):
        loss, metrics, _, weight = accumulate(
            objective, params, ref_params, batch, with_grad=False, loss_state=loss_state
        )
        return {k: v * weight for k, v in (metrics | {"loss": loss}).items()}, weight

    return eval_step
