"""The offline loop (sft, paired, unpaired, reward): one batch from the data, one update.

build the batch stream -> restore or init -> for each step: batch, step, (TR-DPO reference
update), log, evaluate, checkpoint. The plumbing (setup, init or restore, the non-finite guard,
checkpoint cadence, SIGTERM) is `jaxalign.train.run`; this module is the straight line through it.

Failure handling: a non-finite loss or gradient norm (checked at every log step and before every
save, so a bad state is never written) stops the run naming the step and the last good checkpoint;
SIGTERM (preemption) finishes the current step, saves, and exits.
"""

from __future__ import annotations

import pathlib
import time

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from jaxalign.checkpoint import manager as ckpt
from jaxalign.errors import ConfigError
from jaxalign.train import reference
from jaxalign.train.objectives import finalize_metrics
from jaxalign.train.run import (
    Run,
    Session,
    check_finite,
    checkpoint_due,
    frozen_params,
    session,
    setup,
)


def make_evaluator(run: Run):
    """`evaluate(params, ref_params, loss_state) -> metrics averaged over data.eval` (None
    without one)."""
    config = run.config
    eval_step = run.jit_eval_step()

    def evaluate(params, ref_params, loss_state=None) -> dict | None:
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
    """Evaluate the latest checkpoint of a run on `data.eval` (the reference is the run's: its
    initial weights or soup, a TR-DPO run's the checkpointed one, as in training). `config` is
    normally the run's own recorded config (`jaxalign eval` reads WORKDIR/config.json)."""
    run = setup(config)
    if not config.data.eval:
        raise ConfigError("data.eval is empty: nothing to evaluate on")
    manager, step = ckpt.open_latest(workdir)
    try:
        state, _ = ckpt.restore(manager, run.abstract_target(), step)
    finally:
        manager.close()
    ref_params = state.pop("ref") if "ref" in state else frozen_params(run)
    return make_evaluator(run)(state["params"], ref_params, state.get("loss_state"))


def train(
    config: ConfigDict, workdir: str | pathlib.Path, *, allow_config_change: bool = False
) -> dict:
    """Run (or resume) training as configured; returns the run's summary (`summary.json`):
    the last train and eval metrics, timing and the last checkpoint."""
    with session(config, workdir, allow_config_change=allow_config_change) as s:
        return s.finished if s.finished is not None else _loop(s)


def _loop(s: Session) -> dict:
    run, config, state, ref_params, first = s.run, s.run.config, s.state, s.ref_params, s.first
    pipeline, manager, stop, workdir = s.pipeline, s.manager, s.stop, s.workdir
    train_step = run.jit_train_step()
    update_ref = reference.make_update(config, run.param_shardings)
    evaluate = make_evaluator(run)
    writer = s.writer
    last_train, last_eval, saved = {}, None, None
    started, total_tokens, truncated = time.perf_counter(), 0.0, 0
    try:
        if first == 0 and config.data.eval:
            last_eval = evaluate(state["params"], ref_params, state.get("loss_state"))
            writer.write(0, last_eval, split="eval")
        tick, tokens = time.perf_counter(), 0.0
        if stop:  # stopped before the first step: nothing new to save
            writer.print(f"{stop.name} received before training started; exiting")
        for step in range(first, first if stop else config.steps):
            micro = [next(pipeline) for _ in range(config.optimizer.grad_accum)]
            state, metrics = train_step(state, ref_params, run.global_batch(micro))
            writer.advance()
            done = step + 1
            if reference.due(config, done):
                ref_params = update_ref(ref_params, state["params"])
            tokens = tokens + metrics["tokens"]  # stays on device: no sync per step
            if done % config.log_every == 0 or done == config.steps:
                check_finite(metrics, done, config, manager, workdir)
                now, tokens = time.perf_counter(), float(tokens)
                metrics = dict(metrics) | {"tokens_per_s": tokens / max(now - tick, 1e-9)}
                if pipeline.num_truncated != truncated:
                    if not truncated:
                        writer.print(_truncation_note(config))
                    truncated = pipeline.num_truncated
                    metrics["data/truncated_examples"] = truncated
                tick, total_tokens, tokens = now, total_tokens + tokens, 0.0
                last_train = writer.write(done, metrics)
            if config.eval_every and done % config.eval_every == 0 and done < config.steps:
                eval_metrics = evaluate(state["params"], ref_params, state.get("loss_state"))
                writer.write(done, eval_metrics or {}, split="eval")
            if checkpoint_due(config, done, bool(stop)):
                check_finite(metrics, done, config, manager, workdir)
                saved_state = state | ({"ref": ref_params} if update_ref else {})
                ckpt.save(manager, done, saved_state, pipeline.get_state(), s.record)
                saved = done
            if stop:
                writer.print(f"step {done}: {stop.name} received; checkpoint saved, exiting")
                break
        if not stop and config.data.eval:
            last_eval = evaluate(state["params"], ref_params, state.get("loss_state"))
            writer.write(config.steps, last_eval, split="eval")
    finally:
        writer.close()
    return s.finish(
        saved=saved,
        wall=time.perf_counter() - started,
        tokens=total_tokens,
        train=last_train,
        eval=last_eval,
    )


def _truncation_note(config: ConfigDict) -> str:
    return (
        f"{config.data.train}: some examples are longer than data.max_len={config.data.max_len} "
        f"/ data.max_prompt_len={config.data.max_prompt_len} and are truncated (counted in "
        "metrics as data/truncated_examples)"
    )
