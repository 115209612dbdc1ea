"""The training loop shared by every family: straight-line, no trainer classes.

build pipeline -> restore or init -> for each step: batch, step, log, evaluate, checkpoint.

Failure handling: a non-finite loss or gradient norm (checked at every log step and before every
save, so a bad state is never written) stops the run naming the step and the last good checkpoint;
SIGTERM (preemption) finishes the current step, saves, and exits.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from jaxalign import losses, models, sharding
from jaxalign.checkpoint import manager as ckpt
from jaxalign.config import check_known_keys, to_dict
from jaxalign.data import (
    CACHE_FIELDS,
    load_tokenizer,
    make_pair_pipeline,
    make_ref_join,
    make_sft_pipeline,
    make_unpaired_pipeline,
)
from jaxalign.errors import ConfigError, TrainingError
from jaxalign.train import reward, steps
from jaxalign.train.metrics import MetricsWriter
from jaxalign.train.optimizer import learning_rate_schedule, make_optimizer
from jaxalign.train.unpaired import WithRetain

FAMILIES = ("sft", "dpo", "unpaired", "reward")


def model_config_from(config: ConfigDict):
    """The architecture, with the config's dtype/remat overrides: the one recorded where
    `model.init_from` points ("hf:DIR" config.json, "checkpoint:DIR" record), else the preset."""
    kind, _, where = config.model.init_from.partition(":")
    if kind == "hf":
        from jaxalign.checkpoint import load_hf_config

        mc = load_hf_config(where)
    elif kind == "checkpoint":
        from jaxalign.checkpoint.convert import read_model_config

        mc = read_model_config(where).replace(dtype="float32", param_dtype="float32")
    else:
        mc = models.get_preset(config.model.preset)
    changes = {}
    if config.model.dtype:
        changes["dtype"] = config.model.dtype
    if config.model.remat:
        changes["remat"] = config.model.remat
    return dataclasses.replace(mc, **changes)


def make_loss(config: ConfigDict) -> losses.Bound | losses.Mix:
    """The configured loss, its hyperparameters checked against the loss's signature.

    `loss.name` a name in `jaxalign.losses.names()`, the other `loss.*` keys its hyperparameters;
    or `loss.name = "mix"` with `loss.terms` a tuple of `(name, weight[, hyper[, rename]])`, e.g.
    MPO: `(("dpo", 0.8, {"beta": 0.1}), ("bco_pair", 0.2, {}), ("sft", 1.0, {}))`: loss =
    sum_k weight_k loss_k (`jaxalign.losses.mix`)."""
    loss = config.loss.to_dict()
    name = loss.pop("name")
    try:
        if name != "mix":
            return losses.bind(name, **loss)
        terms = loss.pop("terms", ())
        if loss or not terms:
            raise ValueError(
                f"a mix takes `loss.terms` (name, weight[, hyper[, rename]]) only, got "
                f"terms={terms!r} and {sorted(loss)}"
            )
        return losses.mix([tuple(t) for t in terms])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"loss {name!r}: {e}") from None


def make_objective(config: ConfigDict, model_config):
    """(objective, needs_ref): whether the run holds reference params (a reference-free loss, or
    cached reference log-probs `data.ref_logps`, needs none)."""
    impl = None if config.logprob_impl == "auto" else config.logprob_impl
    groups = jax.process_count()
    family = config.trainer
    if family not in FAMILIES:
        raise ConfigError(f'trainer "{family}" is unknown (known: {", ".join(FAMILIES)})')
    if config.data.ref_logps and family != "dpo":
        raise ConfigError('data.ref_logps: cached reference log-probs are for trainer "dpo"')
    if family == "sft":
        objective = steps.sft_objective(model_config, num_groups=groups, implementation=impl)
        return objective, False
    loss = make_loss(config)
    try:
        if family == "reward":
            return reward.reward_objective(model_config, loss, num_groups=groups), False
        make = steps.preference_objective if family == "dpo" else steps.unpaired_objective
        objective = make(model_config, loss, num_groups=groups, implementation=impl)
    except ValueError as e:
        raise ConfigError(f"loss: {e}") from None
    return objective, loss.needs_reference and not config.data.ref_logps


def ref_cache_settings(config: ConfigDict) -> dict:
    """What cached reference log-probs depend on; the join checks them against the cache's."""
    return {
        "tokenizer": config.tokenizer,
        "template": config.data.template,
        "max_len": config.data.max_len,
        "max_prompt_len": config.data.max_prompt_len,
        "train_on_prompt": config.data.train_on_prompt,
        "reference": config.model.init_from or f"{config.model.preset} seed={config.seed}",
    }


def make_pipeline(config: ConfigDict, tokenizer, path: str, *, train: bool, ref_join=True):
    """The family's batch iterator for one split (layouts: `jaxalign.data.pipeline`).

    sft: SFT records; dpo / reward: pairs (with `data.ref_logps`, the cached reference log-probs
    joined in as per-pair fields); unpaired: `jaxalign.train.unpaired`. `data.extra_fields` are
    carried into the batch by name (losses read them, e.g. margin, beta_feature)."""
    family = config.trainer
    kwargs = dict(
        # data.batch_size is the global batch: each host reads its share of each micro-batch.
        batch_size=config.data.batch_size // (config.optimizer.grad_accum * jax.process_count()),
        max_len=config.data.max_len,
        max_prompt_len=config.data.max_prompt_len,
        pack=config.data.pack,
        seed=config.data.shuffle_seed,
        template=config.data.template,
        skip_bad_records=config.data.skip_bad_records,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        train_on_prompt=config.data.train_on_prompt,
    )
    extra, transforms = tuple(config.data.extra_fields), []
    make = make_sft_pipeline
    if family in ("dpo", "reward"):
        make = make_pair_pipeline
        if config.data.ref_logps and ref_join:
            transforms.append(_ref_join(config.data.ref_logps, ref_cache_settings(config)))
            extra += CACHE_FIELDS
    elif family == "unpaired":
        loss = make_loss(config)
        if "labels" in steps.loss_inputs(loss):
            make = make_unpaired_pipeline
            kwargs["kl_sequences"] = steps.kl_sequences_needed(loss)
    pipeline = make(
        path,
        tokenizer,
        transforms=transforms,
        extra_fields=extra,
        num_epochs=None if train else 1,
        **kwargs,
    )
    if family == "unpaired" and config.data.retain:
        kwargs.pop("kl_sequences", None)
        pipeline = WithRetain(pipeline, make_sft_pipeline(config.data.retain, tokenizer, **kwargs))
    return pipeline


@functools.lru_cache(maxsize=2)
def _ref_join_cached(path: str, mtime: float, settings_json: str):
    return make_ref_join(path, json.loads(settings_json))


def _ref_join(path: str, settings: dict):
    """The cache join transform, loaded once per file version (evaluations rebuild pipelines)."""
    mtime = pathlib.Path(path).stat().st_mtime if pathlib.Path(path).exists() else 0.0
    return _ref_join_cached(path, mtime, json.dumps(settings, sort_keys=True))


def state_shardings(mesh, param_shardings, abstract_state):
    """Optimizer slots shard like the parameter they track (matched by path suffix and shape);
    counters and other scalars are replicated."""
    by_path = {path: s for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        for start in range(len(path)):
            s = by_path.get(tuple(path[start:]))
            if s is not None and len(s.spec) <= leaf.ndim:
                return s
        return replicated

    opt = jax.tree_util.tree_map_with_path(pick, abstract_state["opt_state"])
    out = {"step": replicated, "params": param_shardings, "opt_state": opt}
    # Loss state (BCO's running delta): a few scalars, replicated.
    return out | {
        k: jax.tree.map(lambda _: replicated, v) for k, v in abstract_state.items() if k not in out
    }


def init_params(config: ConfigDict, model_config, param_shardings):
    """Initial weights, created or loaded straight into their shardings. A reward model's head
    starts at zero; only the decoder comes from `model.init_from`."""
    if reward.HEAD in param_shardings:
        shardings = reward.decoder_params(param_shardings)
        head = jax.jit(
            reward.init_head, static_argnums=0, out_shardings=param_shardings[reward.HEAD]
        )(model_config)
        return reward.with_head(init_params(config, model_config, shardings), head)
    source = config.model.init_from
    if not source:
        init = jax.jit(models.init_params, static_argnums=0, out_shardings=param_shardings)
        return init(model_config, jax.random.key(config.seed))
    kind, _, where = source.partition(":")
    if kind == "checkpoint":
        abstract = models.abstract_params(model_config)
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract,
            param_shardings,
        )
        return ckpt.load_params(where, abstract)
    if kind == "hf":
        from jaxalign.checkpoint import load_hf

        _, params = load_hf(where, dtype=model_config.param_dtype, shardings=param_shardings)
        return params
    raise ConfigError(f'model.init_from="{source}": expected "", "checkpoint:DIR" or "hf:DIR"')


def _finite(metrics: dict) -> bool:
    return all(math.isfinite(float(metrics[k])) for k in ("loss", "grad_norm"))


def _under_mesh(mesh, jitted):
    """`jitted`, traced and run under `jax.set_mesh(mesh)` so the log-prob kernel sees the mesh
    (see `steps.token_logps`); `.lower(...)` too, for compile-only plans."""

    def call(*args):
        with jax.set_mesh(mesh):
            return jitted(*args)

    def lower(*args):
        with jax.set_mesh(mesh):
            return jitted.lower(*args)

    call.lower = lower
    return call


@dataclasses.dataclass
class Setup:
    """Everything a run derives from its config before touching data or weights."""

    config: ConfigDict
    model_config: models.ModelConfig
    tokenizer: object
    objective: object
    needs_ref: bool
    mesh: jax.sharding.Mesh
    param_shardings: object
    state_shardings: dict
    abstract_state: dict
    rules: sharding.ShardingRules
    tx: object
    schedule: object

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def abstract_target(self) -> dict:
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract_state,
            self.state_shardings,
        )

    def jit_train_step(self):
        step = jax.jit(
            steps.make_train_step(self.objective, self.tx, self.schedule),
            in_shardings=(self.state_shardings, self._ref_shardings(), None),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=0,
        )
        return _under_mesh(self.mesh, step)

    def jit_eval_step(self):
        step = jax.jit(
            steps.make_eval_step(self.objective),
            in_shardings=(self.param_shardings, self._ref_shardings(), None, None),
            out_shardings=self.replicated,
        )
        return _under_mesh(self.mesh, step)

    def global_batch(self, micro_batches: list[dict]) -> dict:
        """Host batches -> one global batch with a leading micro-batch axis, rows sharded."""
        stacked = {k: np.stack([b[k] for b in micro_batches]) for k in micro_batches[0]}
        return sharding.to_global(stacked, self.mesh, self.rules, row_axis=1)

    def _ref_shardings(self):
        return self.param_shardings if self.needs_ref else None


def setup(config: ConfigDict, *, devices=None, read_files: bool = True, model_config=None) -> Setup:
    """The run's model, objective, mesh, shardings and optimizer, from the config alone.

    `devices`: the mesh's devices (default: all devices of all processes), e.g. one device for a
    reference run, or a TPU topology's devices for compile-only planning. `read_files=False`
    (compile-only planning) loads no tokenizer, and takes the architecture from `model.preset`
    when the `model.init_from` directory ("hf:DIR", "checkpoint:DIR") is not on this machine, so
    a recipe can be planned without its files. `model_config` replaces the config's architecture
    (planning compiles a layer-less variant to count FLOPs).
    """
    check_known_keys(config)
    per_step = config.optimizer.grad_accum * jax.process_count()
    if config.data.batch_size % per_step:
        raise ConfigError(
            f"data.batch_size={config.data.batch_size} (the global batch) is not divisible by "
            f"optimizer.grad_accum={config.optimizer.grad_accum} x {jax.process_count()} processes"
        )
    where = config.model.init_from.partition(":")[2]
    if model_config is None and (read_files or not where or pathlib.Path(where).exists()):
        model_config = model_config_from(config)
    elif model_config is None:
        preset_only = ConfigDict(to_dict(config))
        preset_only.model.init_from = ""
        model_config = model_config_from(preset_only)
    tokenizer = None
    if read_files:
        tokenizer = load_tokenizer(config.tokenizer)
        if tokenizer.vocab_size > model_config.vocab_size:
            raise ConfigError(
                f"tokenizer {config.tokenizer} has {tokenizer.vocab_size} tokens but the model "
                f"only {model_config.vocab_size}"
            )
    objective, needs_ref = make_objective(config, model_config)

    mesh = sharding.make_mesh(config.mesh.to_dict(), devices=devices)
    rules = sharding.ShardingRules.preset(config.sharding)
    abstract_params = models.abstract_params(model_config)
    logical_axes = models.param_logical_axes(model_config)
    if config.trainer == "reward":
        abstract_params = reward.with_head(abstract_params, reward.abstract_head(model_config))
        logical_axes = reward.with_head(logical_axes, reward.head_logical_axes())
    param_shardings = sharding.named_shardings(mesh, rules, logical_axes, abstract_params)
    tx = make_optimizer(config.optimizer, config.steps)
    abstract_state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": abstract_params,
        "opt_state": jax.eval_shape(tx.init, abstract_params),
    }
    # Running loss state (BCO's delta), when the objective carries one; saved with the state.
    initial_loss_state = getattr(objective, "initial_loss_state", None)
    if initial_loss_state is not None:
        abstract_state["loss_state"] = jax.eval_shape(lambda: initial_loss_state)
    return Setup(
        config=config,
        model_config=model_config,
        tokenizer=tokenizer,
        objective=objective,
        needs_ref=needs_ref,
        mesh=mesh,
        param_shardings=param_shardings,
        state_shardings=state_shardings(mesh, param_shardings, abstract_state),
        abstract_state=abstract_state,
        rules=rules,
        tx=tx,
        schedule=learning_rate_schedule(config.optimizer, config.steps),
    )


def make_evaluator(run: Setup, ref_params):
    """`evaluate(params) -> metrics averaged over the eval split` (None without an eval file)."""
    config = run.config
    eval_step = run.jit_eval_step()

    def evaluate(params, loss_state=None) -> dict | None:
        if not config.data.eval:
            return None
        sums, total = None, 0.0
        pipeline = make_pipeline(config, run.tokenizer, config.data.eval, train=False)
        for i, batch in enumerate(pipeline):
            if config.eval_batches and i >= config.eval_batches:
                break
            batch = run.global_batch([batch])
            metric_sums, weight = eval_step(params, ref_params, batch, loss_state)
            sums = metric_sums if sums is None else jax.tree.map(jnp.add, sums, metric_sums)
            total += float(weight)
        means = {k: v / max(total, 1e-9) for k, v in sums.items()}
        return {k: float(v) for k, v in steps.finalize_metrics(means).items()}

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
    ref_params = (
        init_params(config, run.model_config, run.param_shardings) if run.needs_ref else None
    )
    return make_evaluator(run, ref_params)(state["params"], state.get("loss_state"))


def train(config: ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Run (or resume) training as configured; returns the last train and eval metrics."""
    workdir = pathlib.Path(workdir)
    run = setup(config)
    manager = ckpt.make_manager(
        workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    pipeline = make_pipeline(config, run.tokenizer, config.data.train, train=True)
    resuming = manager.latest_step() is not None
    initial = None
    if run.needs_ref or not resuming:
        initial = init_params(config, run.model_config, run.param_shardings)
    # The reference is the initial policy (recomputed from the same source on resume); a copy
    # when the policy starts from the same arrays, because the step donates the policy's buffers.
    ref_params = None
    if run.needs_ref:
        ref_params = initial if resuming else jax.tree.map(jnp.copy, initial)
    if resuming:
        state, data_state = ckpt.restore(manager, run.abstract_target())
        pipeline.set_state(data_state)
    else:
        opt_init = jax.jit(run.tx.init, out_shardings=run.state_shardings["opt_state"])
        state = {
            "step": jax.device_put(jnp.zeros((), jnp.int32), run.replicated),
            "params": initial,
            "opt_state": opt_init(initial),
        }
        if "loss_state" in run.abstract_state:
            loss_state = run.objective.initial_loss_state
            state["loss_state"] = jax.device_put(loss_state, run.replicated)
    del initial
    start = int(state["step"])
    train_step = run.jit_train_step()
    evaluate = make_evaluator(run, ref_params)

    writer = MetricsWriter(workdir, total_steps=config.steps, start_step=start)
    if pipeline.num_bad_records:
        writer.print(
            f"{config.data.train}: skipped {pipeline.num_bad_records} malformed records "
            "(data.skip_bad_records=True)"
        )
    config_record = to_dict(config) | {"model_config": dataclasses.asdict(run.model_config)}
    preempted = []
    previous = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))

    def check(metrics, step):
        if not _finite(metrics):
            manager.wait_until_finished()
            last = manager.latest_step()
            where = ckpt.checkpoint_dir(workdir) / str(last) if last is not None else "none"
            bad = "loss" if not math.isfinite(float(metrics["loss"])) else "gradient norm"
            raise TrainingError(
                f"step {step}: {bad} is not finite; stopped. Last good checkpoint: {where}"
            )

    last_train, last_eval = {}, None
    try:
        if start == 0 and config.data.eval:
            last_eval = evaluate(state["params"], state.get("loss_state"))
            writer.write(0, last_eval, split="eval")
        tick, tokens = time.perf_counter(), 0.0
        for step in range(start, config.steps):
            micro = [next(pipeline) for _ in range(config.optimizer.grad_accum)]
            batch = run.global_batch(micro)
            state, metrics = train_step(state, ref_params, batch)
            writer.advance()
            done = step + 1
            tokens = tokens + metrics["tokens"]  # stays on device: no sync per step
            if done % config.log_every == 0 or done == config.steps:
                check(metrics, done)
                now = time.perf_counter()
                metrics = dict(metrics) | {"tokens_per_s": float(tokens) / max(now - tick, 1e-9)}
                tick, tokens = now, 0.0
                last_train = writer.write(done, metrics)
            if config.eval_every and done % config.eval_every == 0 and done < config.steps:
                eval_metrics = evaluate(state["params"], state.get("loss_state"))
                writer.write(done, eval_metrics or {}, split="eval")
            if done % config.checkpoint.every == 0 or done == config.steps or preempted:
                check(metrics, done)
                ckpt.save(manager, done, state, pipeline.get_state(), config_record)
            if preempted:
                writer.print(f"step {done}: SIGTERM received; checkpoint saved, exiting")
                break
        if not preempted and config.data.eval:
            last_eval = evaluate(state["params"], state.get("loss_state"))
            writer.write(config.steps, last_eval, split="eval")
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
        signal.signal(signal.SIGTERM, previous)
    return {"train": last_train, "eval": last_eval, "preempted": bool(preempted)}
