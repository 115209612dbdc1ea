"""The offline loop (sft, paired, unpaired, reward): one batch from the data, one update.

build the batch stream -> restore or init -> for each step: batch, step, log, evaluate,
checkpoint. The plumbing (setup, init or restore, the non-finite guard, checkpoint cadence,
SIGTERM) is `jaxalign.train.run`; this module is the straight line through it.

Failure handling: a non-finite loss or gradient norm (checked at every log step and before every
save, so a bad state is never written) stops the run naming the step and the last good checkpoint;
SIGTERM (preemption) finishes the current step, saves, and exits.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from jaxalign.checkpoint import manager as ckpt
from jaxalign.config import to_dict
from jaxalign.data import Prefetch
from jaxalign.errors import ConfigError
from jaxalign.train.metrics import MetricsWriter
from jaxalign.train.objectives import finalize_metrics
from jaxalign.train.run import (
    Preemption,
    Run,
    check_finite,
    checkpoint_due,
    init_params,
    setup,
    start,
)


def make_evaluator(run: Run, ref_params):
    """`evaluate(params, loss_state) -> metrics averaged over data.eval` (None without one)."""
    config = run.config
    eval_step = run.jit_eval_step()

    def evaluate(params, loss_state=None) -> dict | None:
        if not config.data.eval:
            return None
        sums, total = None, 0.0
        for i, batch in enumerate(run.batches(config.data.eval, train=False)):
            if config.eval_batches and i >= config.eval_batches:
                break
            metric_sums, weight = eval_step(
                params, ref_params, run.global_batch([batch]), loss_state
            )
            sums = metric_sums if sums is None else jax.tree.map(jnp.add, sums, metric_sums)
            total += float(weight)
        means = {k: v / max(total, 1e-9) for k, v in sums.items()}
        return {k: float(v) for k, v in finalize_metrics(means).items()}

    return evaluate


def evaluate_checkpoint(config: ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Evaluate the latest checkpoint of a run on `data.eval` (the reference is the run's
    initial weights, as in training)."""
    run = setup(config)
    if not config.data.eval:
        raise ConfigError("data.eval is empty: nothing to evaluate on")
    manager, step = ckpt.open_latest(workdir)
    try:
        state, _ = ckpt.restore(manager, run.abstract_target(), step)
    finally:
        manager.close()
    ref_params = init_params(run) if run.needs_ref else None
    return make_evaluator(run, ref_params)(state["params"], state.get("loss_state"))


def train(config: ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Run (or resume) training as configured; returns the last train and eval metrics."""
    workdir = pathlib.Path(workdir)
    run = setup(config)
    manager = ckpt.make_manager(
        workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    # Batches are built on a thread while the device runs the previous step.
    pipeline = Prefetch(run.batches(config.data.train, train=True))
    state, ref_params = start(run, manager, pipeline)
    first = int(state["step"])
    train_step = run.jit_train_step()
    evaluate = make_evaluator(run, ref_params)
    writer = MetricsWriter(workdir, total_steps=config.steps, start_step=first)
    if pipeline.num_bad_records:
        writer.print(
            f"{config.data.train}: skipped {pipeline.num_bad_records} malformed records "
            "(data.skip_bad_records=True)"
        )
    record = to_dict(config) | {"model_config": dataclasses.asdict(run.model_config)}
    last_train, last_eval = {}, None
    try:
        with Preemption() as stop:
            if first == 0 and config.data.eval:
                last_eval = evaluate(state["params"], state.get("loss_state"))
                writer.write(0, last_eval, split="eval")
            tick, tokens = time.perf_counter(), 0.0
            for step in range(first, config.steps):
                micro = [next(pipeline) for _ in range(config.optimizer.grad_accum)]
                state, metrics = train_step(state, ref_params, run.global_batch(micro))
                writer.advance()
                done = step + 1
                tokens = tokens + metrics["tokens"]  # stays on device: no sync per step
                if done % config.log_every == 0 or done == config.steps:
                    check_finite(metrics, done, manager, workdir)
                    now = time.perf_counter()
                    metrics = dict(metrics) | {
                        "tokens_per_s": float(tokens) / max(now - tick, 1e-9)
                    }
                    tick, tokens = now, 0.0
                    last_train = writer.write(done, metrics)
                if config.eval_every and done % config.eval_every == 0 and done < config.steps:
                    eval_metrics = evaluate(state["params"], state.get("loss_state"))
                    writer.write(done, eval_metrics or {}, split="eval")
                if checkpoint_due(config, done, bool(stop)):
                    check_finite(metrics, done, manager, workdir)
                    ckpt.save(manager, done, state, pipeline.get_state(), record)
                if stop:
                    writer.print(f"step {done}: SIGTERM received; checkpoint saved, exiting")
                    break
            if not stop and config.data.eval:
                last_eval = evaluate(state["params"], state.get("loss_state"))
                writer.write(config.steps, last_eval, split="eval")
    finally:
        pipeline.close()
        manager.wait_until_finished()
        manager.close()
        writer.close()
    return {"train": last_train, "eval": last_eval, "preempted": bool(stop)}
