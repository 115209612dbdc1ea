"""The run plumbing every loop shares, as plain functions: the run's model, objective, mesh,
shardings and optimizer (`setup` -> `Run`); initial weights (`init_params`); init or restore
(`start`); the non-finite guard (`check_finite`); checkpoint cadence (`checkpoint_due`); and
SIGTERM handling (`Preemption`). The metrics writer is `jaxalign.train.metrics.MetricsWriter`.

Loops (`jaxalign.train.offline`, ...) call these in a straight line; none of them lives inside a
loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from jaxalign import models, sharding
from jaxalign.checkpoint import manager as ckpt
from jaxalign.config import check_known_keys, to_dict
from jaxalign.data import Prefetch, load_tokenizer
from jaxalign.errors import ConfigError, TrainingError
from jaxalign.models import heads
from jaxalign.train import families, reference, steps, updates
from jaxalign.train import workdir as workdirs
from jaxalign.train.metrics import MetricsWriter
from jaxalign.train.objectives import Objective
from jaxalign.train.optimizer import learning_rate_schedule, make_optimizer

# Random streams of `seed` besides the init of the decoder (key(seed) itself) and the online
# rollouts (fold_in(key(seed), step)): fold_in(key(seed), stream).
ADAPTER_STREAM = 0x4C6F5241  # LoRA A matrices
DROPOUT_STREAM = 0x4C6F5244  # LoRA dropout masks, then folded with the step and micro-batch

# Checkpointed state the loops carry outside the train step: an online loop's "rl" (KL
# coefficient, reward statistics) and a TR-DPO reference ("ref", passed as the step's frozen
# weights).
LOOP_STATE = ("rl", "ref")


def model_config_from(config: ConfigDict) -> models.ModelConfig:
    """The architecture, with the config's dtype/remat overrides and LoRA adapters (`lora.rank` >
    0): the one recorded where `model.init_from` points ("hf:DIR" config.json, "checkpoint:DIR"
    record), else the preset."""
    kind, _, where = config.model.init_from.partition(":")
    if kind == "hf":
        from jaxalign.checkpoint import load_hf_config

        mc = load_hf_config(where)
    elif kind == "checkpoint":
        from jaxalign.checkpoint.convert import read_model_config

        mc = read_model_config(where).replace(dtype="float32", param_dtype="float32", lora=None)
    elif config.model.preset in models.PRESETS:
        mc = models.get_preset(config.model.preset)
    else:
        known = ", ".join(sorted(models.PRESETS))
        raise ConfigError(f'model.preset "{config.model.preset}" is unknown (known: {known})')
    changes = {}
    if config.model.dtype:
        changes["dtype"] = config.model.dtype
    if config.model.remat:
        changes["remat"] = config.model.remat
    if config.model.attention:
        changes["attention"] = config.model.attention
    if config.model.layer_loop:
        changes["layer_loop"] = config.model.layer_loop
    if config.lora.rank:
        try:
            changes["lora"] = models.LoraConfig(**config.lora.to_dict())
        except (TypeError, ValueError) as e:
            raise ConfigError(f"lora: {e}") from None
    try:
        return dataclasses.replace(mc, **changes)
    except ValueError as e:  # a bad model.dtype / remat / attention override
        raise ConfigError(f"model: {e}") from None


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
    if "ref" in abstract_state:  # a TR-DPO reference, sharded like the policy
        out["ref"] = param_shardings
    # Loss state (BCO's running delta): a few scalars, replicated.
    return out | {
        k: jax.tree.map(lambda _: replicated, v) for k, v in abstract_state.items() if k not in out
    }


@dataclasses.dataclass
class Run:
    """Everything a run derives from its config before touching data or weights."""

    config: ConfigDict
    family: families.Family
    model_config: models.ModelConfig
    tokenizer: object
    objective: Objective
    mesh: jax.sharding.Mesh
    rules: sharding.ShardingRules
    param_shardings: object  # of the trained params, state["params"]
    base_shardings: object  # of the decoder's weights (the frozen base of a LoRA run)
    state_shardings: dict
    abstract_state: dict
    tx: object
    schedule: object

    @property
    def needs_ref(self) -> bool:
        return self.objective.needs_ref

    @property
    def lora(self) -> bool:
        """Only LoRA adapters (and a head) train; the base weights are frozen."""
        return self.model_config.lora is not None

    @property
    def holds_frozen(self) -> bool:
        """Whether the steps take frozen weights (`ref_params`): the reference policy, or a LoRA
        run's base (which is also its reference)."""
        return self.lora or self.needs_ref

    def policy_params(self, params, frozen):
        """The params the policy runs with (sampling, old log-probs): `state["params"]`, or for
        LoRA the frozen base with the trained adapters (and head) attached (no copy)."""
        return frozen | params if self.lora else params

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def abstract_target(self) -> dict:
        """The abstract train state with its shardings (restore target, compile-only input)."""
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract_state,
            self.state_shardings,
        )

    def jit_train_step(self):
        """The jitted update; it takes and donates the state it updates: everything but what the
        loop carries itself (`LOOP_STATE`)."""
        shardings = {k: v for k, v in self.state_shardings.items() if k not in LOOP_STATE}
        dropout_key = None
        if self.lora and self.model_config.lora.dropout > 0:
            dropout_key = jax.random.fold_in(jax.random.key(self.config.seed), DROPOUT_STREAM)
        step = steps.make_train_step(
            self.objective, self.tx, self.schedule, lora=self.lora, dropout_key=dropout_key
        )
        return jax.jit(
            step,
            in_shardings=(shardings, self._ref_shardings(), None),
            out_shardings=(shardings, self.replicated),
            donate_argnums=0,
        )

    def jit_eval_step(self):
        return jax.jit(
            steps.make_eval_step(self.objective, lora=self.lora),
            in_shardings=(self.param_shardings, self._ref_shardings(), None, None),
            out_shardings=self.replicated,
        )

    def global_batch(self, micro_batches: list[dict]) -> dict:
        """Host batches -> one global batch with a leading micro-batch axis, rows sharded."""
        stacked = {k: np.stack([b[k] for b in micro_batches]) for k in micro_batches[0]}
        try:
            return sharding.to_global(stacked, self.mesh, self.rules, row_axis=1)
        except ValueError as e:
            split = " x rl.group_size / rl.minibatches" if self.family.loop == "online" else ""
            raise ConfigError(
                f"{e}: the rows of a micro-batch (data.batch_size{split} / optimizer.grad_accum / "
                "processes) must split evenly over the mesh's row shards"
            ) from None

    def batches(self, path: str, *, train: bool):
        """The family's batch iterator over one split (endless for training, one pass else)."""
        return self.family.batches(self, path, train=train)

    def frozen_layout(self):
        """(abstract params, shardings) of the steps' frozen weights: a LoRA run's base, a
        distillation teacher, else the reference (laid out as the policy)."""
        if self.lora:
            return models.abstract_params(self.model_config), self.base_shardings
        teacher, teacher_ref = self.objective.teacher, self.objective.teacher_ref
        policy = self.abstract_state["params"], self.param_shardings
        if teacher is None:
            return policy

        def layout(mc):
            abstract = models.abstract_params(mc)
            axes = models.param_logical_axes(mc)
            return abstract, sharding.named_shardings(self.mesh, self.rules, axes, abstract)

        if teacher_ref is None:
            return layout(teacher.model_config)
        parts = {
            "ref": policy,
            "teacher": layout(teacher.model_config),
            "teacher_ref": layout(teacher_ref.model_config),
        }
        return {k: v[0] for k, v in parts.items()}, {k: v[1] for k, v in parts.items()}

    def _ref_shardings(self):
        return self.frozen_layout()[1] if self.holds_frozen else None


def setup(config: ConfigDict, *, devices=None, read_files: bool = True, model_config=None) -> Run:
    """The run's family, model, objective, mesh, shardings and optimizer, from the config alone.

    `devices`: the mesh's devices (default: all devices of all processes), e.g. one device for a
    reference run, or a TPU topology's devices for compile-only planning. `read_files=False`
    (compile-only planning) loads no tokenizer, and takes the architecture from `model.preset`
    when the `model.init_from` directory ("hf:DIR", "checkpoint:DIR") is not on this machine, so
    a recipe can be planned without its files. `model_config` replaces the config's architecture
    (planning compiles a layer-less variant to count FLOPs).
    """
    check_known_keys(config)
    family = families.get(config.trainer)
    per_step = config.optimizer.grad_accum * jax.process_count()
    if config.data.batch_size % per_step:
        raise ConfigError(
            f"data.batch_size={config.data.batch_size} (the global batch) is not divisible by "
            f"optimizer.grad_accum={config.optimizer.grad_accum} x {jax.process_count()} processes"
        )
    if config.data.ref_logps and not family.takes_ref_cache:
        raise ConfigError(
            f"data.ref_logps: cached reference log-probs are for the paired and unpaired "
            f'trainers, not "{config.trainer}"'
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
    dcn = config.dcn_mesh.to_dict()
    mesh = sharding.make_mesh(
        config.mesh.to_dict(),
        dcn_shape=dcn if math.prod(dcn.values()) != 1 else None,
        devices=devices,
    )
    rules = sharding.ShardingRules.preset(config.sharding)
    objective = family.objective(config, model_config, mesh)
    reference.check(config, loop=family.loop, needs_ref=objective.needs_ref)
    families.check_costs(config, family)
    families.check_self_judge(config)

    base_abstract = models.abstract_params(model_config)
    base_axes = models.param_logical_axes(model_config)
    abstract_params, logical_axes = base_abstract, base_axes
    if model_config.lora is not None:  # only the adapters train
        abstract_params = models.attach({}, models.abstract_adapters(model_config))
        logical_axes = models.attach({}, models.adapter_logical_axes(model_config))
    if family.head:
        outputs = family.head_outputs(config) if family.head_outputs else 1
        abstract_params[family.head] = heads.abstract_head(model_config, outputs)
        logical_axes[family.head] = heads.head_logical_axes()
    param_shardings = sharding.named_shardings(mesh, rules, logical_axes, abstract_params)
    # An online step makes rl.epochs x rl.minibatches optimizer updates; the schedule is in steps.
    updates_per_step = config.rl.epochs * config.rl.minibatches if family.loop == "online" else 1
    tx = make_optimizer(config.optimizer, config.steps, updates_per_step)
    abstract_state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": abstract_params,
        "opt_state": jax.eval_shape(tx.init, abstract_params),
    }
    if objective.initial_loss_state is not None:
        abstract_state["loss_state"] = jax.eval_shape(lambda: objective.initial_loss_state)
    if reference.update_rule(config) and objective.needs_ref:  # TR-DPO: the reference changes
        abstract_state["ref"] = abstract_params
    if family.loop == "online":  # the loop's own state: KL controller, reward statistics
        abstract_state["rl"] = jax.eval_shape(lambda: updates.initial_rl_state(config))
    return Run(
        config=config,
        family=family,
        model_config=model_config,
        tokenizer=tokenizer,
        objective=objective,
        mesh=mesh,
        rules=rules,
        param_shardings=param_shardings,
        base_shardings=sharding.named_shardings(mesh, rules, base_axes, base_abstract),
        state_shardings=state_shardings(mesh, param_shardings, abstract_state),
        abstract_state=abstract_state,
        tx=tx,
        schedule=learning_rate_schedule(config.optimizer, config.steps, updates_per_step),
    )


def init_params(run: Run):
    """Initial trained params, created or loaded straight into their shardings: the decoder from
    `model.init_from` or the random init of `seed` (with LoRA instead the adapters, from `seed`:
    `base_params` gives the decoder). A family's head (reward, value) starts at zero."""
    config, shardings = run.config, dict(run.param_shardings)
    head_sharding = shardings.pop(run.family.head, None)
    if run.lora:
        init = jax.jit(models.init_adapters, static_argnums=0, out_shardings=shardings["lora"])
        key = jax.random.fold_in(jax.random.key(config.seed), ADAPTER_STREAM)
        params = models.attach({}, init(run.model_config, key))
    else:
        params = _decoder_params(config.model.init_from, config.seed, run.model_config, shardings)
    if run.family.head:
        outputs = heads.head_outputs(run.abstract_state["params"][run.family.head])
        init = jax.jit(heads.init_head, static_argnums=(0, 1), out_shardings=head_sharding)
        params[run.family.head] = init(run.model_config, outputs)
    if run.family.head == heads.VALUE_HEAD and config.rl.value_init:
        # PPO's critic starts as the reward model's head (trained on the same decoder start).
        from jaxalign.train.reward import load_reward_model

        rm_config, rm_params = load_reward_model(config.rl.value_init)
        if rm_config.d_model != run.model_config.d_model:
            raise ConfigError(
                f"rl.value_init={config.rl.value_init}: its model width {rm_config.d_model} is "
                f"not the policy's {run.model_config.d_model}"
            )
        params[heads.VALUE_HEAD] = jax.device_put(rm_params[heads.REWARD_HEAD], head_sharding)
    return params


def base_params(run: Run):
    """The decoder's weights from `model.init_from` (or the random init of `seed`), in their
    shardings: a LoRA run's frozen base."""
    config, shardings = run.config, run.base_shardings
    return _decoder_params(config.model.init_from, config.seed, run.model_config, shardings)


def reference_params(run: Run):
    """The reference's weights as a run starts: the soup of `reference.soup`, else the initial
    decoder (`model.init_from` or the random init of `seed`; a LoRA run's base)."""
    soup = run.config.reference.soup
    if not soup:
        return base_params(run)

    def load(spec):
        return _decoder_params(spec, run.config.seed, run.model_config, run.base_shardings)

    return reference.soup(soup, load, run.model_config, run.base_shardings)


def _decoder_params(source: str, seed: int, model_config, param_shardings):
    """The decoder's weights from `source` ("", "checkpoint:DIR", "hf:DIR") in `param_shardings`."""
    if not source:
        init = jax.jit(models.init_params, static_argnums=0, out_shardings=param_shardings)
        return init(model_config, jax.random.key(seed))
    kind, _, where = source.partition(":")
    if kind == "checkpoint":  # a LoRA run's adapters come merged into its base
        from jaxalign.checkpoint.convert import load_model_params

        return load_model_params(where, shardings=param_shardings)[1]
    if kind == "hf":
        from jaxalign.checkpoint import load_hf

        _, params = load_hf(where, dtype=model_config.param_dtype, shardings=param_shardings)
        return params
    raise ConfigError(f'model.init_from="{source}": expected "", "checkpoint:DIR" or "hf:DIR"')


def frozen_params(run: Run, initial=None):
    """The steps' frozen weights (`ref_params`) as a run starts, or None when the run holds none:
    a LoRA run's base (its reference too); a distillation teacher; else the reference: a soup
    (`reference.soup`) or the initial policy (`initial`, copied because the train step donates
    the policy's buffers, or loaded again). ADPA holds three: {"ref": the student's reference,
    "teacher", "teacher_ref"} (a preset teacher_ref initialised from seed + 2)."""
    if run.lora:
        return base_params(run)
    if not run.needs_ref:
        return None
    teacher, teacher_ref = run.objective.teacher, run.objective.teacher_ref
    if teacher is not None and teacher_ref is None:
        shardings = run.frozen_layout()[1]
        return _decoder_params(teacher.source, run.config.seed + 1, teacher.model_config, shardings)
    if run.config.reference.soup:
        ref = reference_params(run)
    else:
        ref = init_params(run) if initial is None else jax.tree.map(jnp.copy, initial)
    if teacher is None:
        return ref
    shardings = run.frozen_layout()[1]
    seed = run.config.seed
    return {
        "ref": ref,
        "teacher": _decoder_params(
            teacher.source, seed + 1, teacher.model_config, shardings["teacher"]
        ),
        "teacher_ref": _decoder_params(
            teacher_ref.source, seed + 2, teacher_ref.model_config, shardings["teacher_ref"]
        ),
    }


def start(run: Run, manager, pipeline) -> tuple[dict, object]:
    """(state, ref_params): the latest checkpoint restored into its shardings (and `pipeline` set
    to its saved position), or the initial state; and the frozen weights (`frozen_params`),
    recomputed from the same source on resume, except a TR-DPO reference, which is restored
    (`state["ref"]`, taken out of the returned state: the loop carries it)."""
    resuming = manager.latest_step() is not None
    if resuming:
        state, data_state = ckpt.restore(manager, run.abstract_target())
        pipeline.set_state(data_state)
        ref_params = state.pop("ref") if "ref" in state else frozen_params(run)
        return state, ref_params
    initial = init_params(run)
    ref_params = frozen_params(run, initial)
    opt_init = jax.jit(run.tx.init, out_shardings=run.state_shardings["opt_state"])
    state = {
        "step": jax.device_put(jnp.zeros((), jnp.int32), run.replicated),
        "params": initial,
        "opt_state": opt_init(initial),
    }
    if run.objective.initial_loss_state is not None:
        state["loss_state"] = jax.device_put(run.objective.initial_loss_state, run.replicated)
    if "rl" in run.abstract_state:
        state["rl"] = jax.device_put(updates.initial_rl_state(run.config), run.replicated)
    return state, ref_params


def check_finite(metrics: dict, step: int, config: ConfigDict, manager, workdir) -> None:
    """Stop the run (TrainingError naming the step and the last good checkpoint) when the loss or
    the gradient norm is not finite. Called at every log step and before every save, so a
    non-finite state is never written: the "last good" checkpoint is the newest one saved, and
    every save follows this check of its step. (A state that is finite but already diverged, say
    weights of 1e5, is not detected: watch the loss.)

    With `optimizer.skip_nonfinite` = k > 0 the optimizer skips updates whose gradients are not
    finite (metrics `nonfinite_streak`: consecutive so far, `updates_skipped`: in all) and the
    run goes on, until more than k in a row were non-finite: the optimizer then applies one."""
    limit = config.optimizer.skip_nonfinite
    if limit:
        streak = int(metrics["nonfinite_streak"])
        bad = streak > limit
        what = f"{streak} consecutive non-finite gradients (optimizer.skip_nonfinite={limit})"
    else:
        name = next((k for k in ("loss", "grad_norm") if not math.isfinite(float(metrics[k]))), "")
        bad = bool(name)
        what = f"{'loss' if name == 'loss' else 'gradient norm'} is not finite"
    if not bad:
        return
    manager.wait_until_finished()
    last = manager.latest_step()
    where = ckpt.checkpoint_dir(workdir) / str(last) if last is not None else "none"
    raise TrainingError(f"step {step}: {what}; stopped. Last good checkpoint: {where}")


@contextlib.contextmanager
def checkpoints(config: ConfigDict, workdir: pathlib.Path):
    """The run's checkpoint manager; closed (after pending saves) on exit. A checkpoints directory
    this run created and never saved into (a failed start) is removed again."""
    directory = ckpt.checkpoint_dir(workdir)
    fresh = not directory.exists()
    manager = ckpt.make_manager(
        workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    try:
        yield manager
    finally:
        manager.wait_until_finished()
        manager.close()
        if (
            fresh
            and jax.process_index() == 0
            and directory.is_dir()
            and not any(directory.iterdir())
        ):
            directory.rmdir()


def checkpoint_due(config: ConfigDict, done: int, stopping: bool) -> bool:
    """Save every `checkpoint.every` steps, at the last step, and when the run is stopping."""
    return done % config.checkpoint.every == 0 or done == config.steps or stopping


class Preemption:
    """`with Preemption() as stop:` the first SIGTERM (preemption) or SIGINT (Ctrl-C) sets `stop`
    (truthy) instead of killing the process, so the loop finishes its step, saves and exits; a
    second SIGINT ends the process at once with status 130 (an exception could land in a callback
    that swallows it; a checkpoint being written is left in Orbax's temporary directory, never
    half-visible). The previous handlers are restored on exit. `stop.name` names the signal
    received first."""

    def __init__(self):
        self.signals: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.signals)

    @property
    def name(self) -> str:
        return signal.Signals(self.signals[0]).name if self.signals else ""

    def _handle(self, sig, frame):
        if sig == signal.SIGINT and signal.SIGINT in self.signals:
            os.write(2, b"\njaxalign: interrupted\n")
            os._exit(130)
        self.signals.append(sig)

    def __enter__(self):
        self._previous = {
            s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)
        }
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class Session:
    """A started run: what every loop begins with (`session`)."""

    run: Run
    workdir: pathlib.Path
    manager: object
    pipeline: object
    stop: Preemption
    writer: MetricsWriter | None = None
    state: dict | None = None
    ref_params: object = None
    first: int = 0
    record: dict | None = None
    finished: dict | None = None  # the summary of a run that had already finished

    def finish(self, *, saved, wall, tokens, train, eval, **extra) -> dict:
        """The run's summary: printed, written to WORKDIR/summary.json and returned."""
        config = self.run.config
        stopped = bool(self.stop)
        summary = {
            "trainer": config.trainer,
            "workdir": str(self.workdir),
            "steps": [self.first, (saved or self.first) if stopped else config.steps],
            "stopped_by": self.stop.name,
            "wall_time_s": wall,
            "tokens_per_s": tokens / max(wall, 1e-9),
            "train": train,
            "eval": eval,
            "checkpoint": str(ckpt.checkpoint_dir(self.workdir) / str(saved)) if saved else None,
            "truncated_examples": self.pipeline.num_truncated,
            "skipped_records": self.pipeline.num_bad_records,
            **extra,
        }
        if jax.process_index() == 0:
            workdirs.write_summary(self.workdir, summary)
            print(format_summary(summary), file=sys.stderr)
        return summary


@contextlib.contextmanager
def session(config: ConfigDict, workdir, *, allow_config_change: bool = False):
    """Start (or resume) a run in `workdir`, for any loop: the workdir checked and locked
    (`jaxalign.train.workdir`), SIGTERM / Ctrl-C handled (`Preemption`) from here on, the run set
    up, its batches built on a thread ahead of the device (`Prefetch`), the checkpoint manager
    opened, the state initialised or restored, the config recorded, the metrics writer opened
    (metrics past the restored step dropped). A run that had already finished yields a session
    with `finished` set to its summary and nothing else started."""
    main = jax.process_index() == 0
    workdir = workdirs.prepare(workdir) if main else pathlib.Path(workdir)
    with Preemption() as stop, workdirs.RunLock(workdir) if main else contextlib.nullcontext():
        changed = (
            workdirs.check_config(workdir, config, allow_change=allow_config_change) if main else []
        )
        run = setup(config)
        pipeline = Prefetch(run.batches(config.data.train, train=True))
        try:
            with checkpoints(config, workdir) as manager:
                s = Session(run, workdir, manager, pipeline, stop)
                latest = manager.latest_step()
                if latest is not None and latest >= config.steps:
                    print(
                        f"jaxalign: {workdir} already finished at step {latest} (steps="
                        f"{config.steps}); nothing to do",
                        file=sys.stderr,
                    )
                    s.finished = workdirs.read_summary(workdir) or {"steps": [latest, latest]}
                    yield s
                    return
                s.state, s.ref_params = start(run, manager, pipeline)
                # The loop's step is the checkpoint's (state["step"] counts optimizer updates: an
                # online step makes rl.epochs x rl.minibatches of them).
                s.first = latest or 0
                s.record = to_dict(config) | {"model_config": dataclasses.asdict(run.model_config)}
                if main:
                    workdirs.write_config(workdir, config)
                    if s.first:
                        workdirs.trim_metrics(workdir, s.first)
                s.writer = MetricsWriter(workdir, total_steps=config.steps, start_step=s.first)
                try:
                    if s.first:
                        s.writer.print(
                            f"resuming from step {s.first} of {config.steps} ({workdir})"
                        )
                    if changed:
                        s.writer.print(f"config changed since the last start: {', '.join(changed)}")
                    if pipeline.num_bad_records:
                        s.writer.print(
                            f"{config.data.train}: skipped {pipeline.num_bad_records} malformed "
                            "records (data.skip_bad_records=True)"
                        )
                    yield s
                finally:
                    s.writer.close()
        finally:
            pipeline.close()


_SUMMARY_KEYS = (
    "loss",
    "rewards/accuracy",
    "rewards/margin",
    "logps/accuracy",
    "rewards/gap",
    "reward",
    "reward/greedy",
    "reward/sampled",
)


def format_summary(summary: dict) -> str:
    """The end-of-run lines printed on the console."""
    first, last = summary["steps"]
    lines = [
        f"summary: {summary['trainer']} steps {first} -> {last} in {summary['wall_time_s']:.1f} s"
        f" ({summary['tokens_per_s']:,.0f} tokens/s)"
        + (f", stopped by {summary['stopped_by']}" if summary["stopped_by"] else "")
    ]
    for split in ("train", "eval"):
        values = summary[split] or {}
        shown = [f"{k} {values[k]:.4g}" for k in _SUMMARY_KEYS if k in values]
        if shown:
            lines.append(f"  {split:5s}  " + ", ".join(shown))
    if summary["truncated_examples"]:
        lines.append(f"  {summary['truncated_examples']} examples truncated to data.max_len")
    lines.append(f"  checkpoint {summary['checkpoint']}  (summary.json in {summary['workdir']})")
    return "\n".join(lines)
