"""Compile-only planning: `jaxalign train --config ... --compile_only [--topology v5p-64]`.

Builds the run's shardings for the config's preset, mesh and sharding preset, lowers and compiles
the real train step (`Run.jit_train_step()`, donated state, explicit shardings) on abstract
inputs — `jax.ShapeDtypeStruct`s carrying their shardings, so no weight, optimizer slot or batch is
ever allocated — and prints what XLA reports for one device: memory (`compiled.memory_analysis()`)
and FLOPs (`compiled.cost_analysis()`), plus the parameter count and tokens per step.

Without `--topology` it compiles for this machine's devices (on CPU, e.g. the 8 fake devices of the
tests). With `--topology` it compiles ahead of time for a TPU slice that is not here, through
`jax.experimental.topologies.get_topology_desc`, which needs libtpu (`pip install 'jax[tpu]'`, the
`[tpu]` extra) but no TPU. Topology names: `jaxalign.sharding.topology`.

FLOPs. The plan prints XLA's count, a count by hand (`analytic_flops`) and the model FLOPs
(6N + 2N per token). XLA's cost analysis counts the body of a while loop once, whatever its trip
count, and jaxalign scans its layers (forward, backward and the reference forward are each a
loop over the L layers), so `compiled.cost_analysis()["flops"]` alone undercounts by about L. The
plan also compiles the same step for the same model with no layers (R0, everything outside the
layer loops) and reports R0 + L (R_L - R0), the whole program for grad_accum = 1 (L >= 2). An
unrolled layer stack (`model.layer_loop`: "auto" unrolls on a CPU platform) is counted whole. With
grad_accum A > 1 the micro-batches are one more loop around the model (traced once), also counted
once, so the reported count is A (R0 + L (R_L - R0)) (the optimizer update, < 0.1% of a step, is
then counted A times instead of once). Measured on TPU v5p, XLA's count is 89-94%
of the count by hand, except for Llama 3.1 70B at 4 sequences per v5p chip (37%: the count
matches the forward and reference loops alone, as if the compiler had restructured the backward
loop into a form its cost analysis skips). Below the model FLOPs, a lower bound, the plan prints
a warning.

The abstract batch has the pipeline's shapes at their largest, in the layout of the family's
objective (`abstract_batch`, `jaxalign.data.layout`): every trainer family plans, with cached
reference log-probs too; `data.extra_fields` (whose width is only known from the data) are
refused. Rows are sharded exactly as `Run.global_batch` shards them.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from jaxalign import models, sampling, sharding
from jaxalign.data import layout
from jaxalign.errors import ConfigError
from jaxalign.models import heads
from jaxalign.models.transformer import layer_unroll
from jaxalign.sampling.engine import PROMPT_KEYS
from jaxalign.sharding.topology import topology_devices, topology_name
from jaxalign.train.run import LOOP_STATE, setup


def abstract_batch(run) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of one train-step batch (leading micro-batch axis) in the layout of the
    run's objective (`jaxalign.data.layout`), sharded like `run.global_batch` shards the real one.
    Shapes at their largest: pad mode R = B rows (B sequences), pack mode R = max(1, B // 2) rows,
    T = data.max_len. Online families: one update's share of a rollout (`update_examples`), rows
    of T = data.max_prompt_len + rl.max_new_tokens - 1 (`jaxalign.rl.rollout`)."""
    config = run.config
    spec = run.objective.batch
    if config.data.extra_fields:
        # A list-valued field's width M (e.g. modpo's margins) is not known without the data.
        raise ConfigError(
            "--compile_only cannot shape data.extra_fields "
            f"{tuple(config.data.extra_fields)} without reading the data; plan without them"
        )
    accum = config.optimizer.grad_accum
    if _online(run):
        examples = update_examples(run) // accum
        rows = examples * spec.sequences_per_example
        T = config.data.max_prompt_len + config.rl.max_new_tokens - 1
    else:
        examples = config.data.batch_size // accum
        sequences = examples * spec.sequences_per_example
        rows = max(1, sequences // 2) if config.data.pack else sequences
        T = config.data.max_len
    shards = math.prod(run.mesh.shape[a] for a in run.rules.mesh_axes("batch"))
    if examples % shards or rows % shards:
        raise ConfigError(
            f"a micro-batch of {examples} examples in {rows} rows (data.batch_size="
            f"{config.data.batch_size} / optimizer.grad_accum={accum}"
            + (
                f", rl.group_size={config.rl.group_size}, rl.minibatches={config.rl.minibatches}"
                if _online(run)
                else ""
            )
            + f") does not split over the {shards} row shards of mesh axes "
            f"{run.rules.mesh_axes('batch')}: every device needs whole examples and rows"
        )

    def sharded(ndim):
        return NamedSharding(run.mesh, P(None, *sharding.batch_spec(run.rules, ndim - 1)))

    return layout.abstract(
        spec,
        examples=examples,
        rows=rows,
        T=T,
        micro_batches=accum,
        sharding=sharded,
    )


def _online(run) -> bool:
    return run.family.loop == "online"


def update_examples(run) -> int:
    """Examples of one online update: a step's rollout rows (data.batch_size prompts x
    rl.group_size; online_dpo and rft: one pair / one best completion per prompt) split into
    rl.minibatches, each further into optimizer.grad_accum micro-batches."""
    config, rl = run.config, run.config.rl
    per_step = config.data.batch_size * (
        rl.group_size if run.objective.batch.records == "rollout" else 1
    )
    parts = rl.minibatches * config.optimizer.grad_accum
    if per_step % parts:
        raise ConfigError(
            f"{per_step} rollout examples per step do not split into rl.minibatches="
            f"{rl.minibatches} x optimizer.grad_accum={config.optimizer.grad_accum}"
        )
    return per_step // rl.minibatches


def _ref_in_step(run) -> bool:
    """Whether the train step runs the reference forward (the policy-gradient families get the
    reference's log-probs with the rollout batch instead)."""
    return run.needs_ref and run.objective.batch.records != "rollout"


def _compile(run):
    """The run's jitted train step, compiled for abstract (sharded, unallocated) inputs."""
    ref = None
    if run.holds_frozen:  # the reference, or a LoRA run's base (its reference too)
        abstract, shardings = run.frozen_layout()
        ref = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
    step = run.jit_train_step()
    state = {k: v for k, v in run.abstract_target().items() if k not in LOOP_STATE}
    return step.lower(state, ref, abstract_batch(run)).compile()


def abstract_prompts(run) -> dict[str, jax.ShapeDtypeStruct]:
    """One step's prompt batch at its largest (data.batch_size prompts x data.max_prompt_len,
    left-padded, `jaxalign.data.make_prompt_pipeline`), rows over the batch axes as
    `jaxalign.sampling.generate` places them."""
    B, Tp = run.config.data.batch_size, run.config.data.max_prompt_len
    shapes = {k: (B, Tp) for k in PROMPT_KEYS} | {"prompt_lengths": (B,)}

    def struct(name, shape):
        axes = ("batch",) + (None,) * (len(shape) - 1)
        spec = sharding.logical_to_spec(axes, run.rules, shape=shape, mesh=run.mesh, name=name)
        return jax.ShapeDtypeStruct(shape, np.int32, sharding=NamedSharding(run.mesh, spec))

    return {k: struct(k, shape) for k, shape in shapes.items()}


def _compile_rollout(run):
    """The online loop's sampling program (`jaxalign.sampling.generate`: prefill + decode loop)
    compiled on the run's mesh for abstract params (their training shardings) and prompts."""
    rl = run.config.rl
    options = sampling.SamplingOptions(
        max_new_tokens=rl.max_new_tokens,
        n=rl.group_size,
        temperature=rl.temperature,
        top_k=rl.top_k,
        top_p=rl.top_p,
        eos_id=0,  # traced values: any id compiles the same program
        pad_id=0,
    )
    params = heads.decoder_params(run.abstract_target()["params"])
    lowered = sampling.lower_generate(
        run.model_config,
        params,
        abstract_prompts(run),
        options=options,
        mesh=run.mesh,
        rules=run.rules,
    )
    return lowered.compile()


def _memory(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled program; total = the live peak XLA plans for."""
    memory = compiled.memory_analysis()
    mem = {
        "arguments": memory.argument_size_in_bytes,
        "outputs": memory.output_size_in_bytes,
        "aliased": memory.alias_size_in_bytes,
        "temporaries": memory.temp_size_in_bytes,
        "generated_code": memory.generated_code_size_in_bytes,
    }
    mem["total"] = (
        mem["arguments"]
        + mem["outputs"]
        - mem["aliased"]
        + mem["temporaries"]
        + mem["generated_code"]
    )
    return mem


def _device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


def _flops(compiled) -> float:
    """FLOPs of one device's program as XLA counts them (loop bodies once)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def _layer_weight_flops(mc) -> int:
    """2 P_layer: forward matmul FLOPs of one layer's projection and MLP weights per token."""
    d, h = mc.d_model, mc.head_dim
    return 2 * (d * (mc.n_heads + 2 * mc.n_kv_heads) * h + mc.n_heads * h * d + 3 * d * mc.d_ff)


def analytic_flops(
    model_config, tokens: int, seq_len: int, needs_ref: bool, lora: bool = False
) -> float:
    """Matmul FLOPs of one train step as the model computes them, counted by hand.

    Per token and layer, forward: 2 P_layer (P_layer = D(NH + 2KH) + NHD + 3DF, the projection and
    MLP weights) + 4 T N H (scores and values over all T columns: the attention materialises full
    masked [T, T] scores). The policy runs forward + backward (3x) plus one more forward of the
    layers under remat "full"; the reference (`needs_ref`: when the step runs it) one forward.
    The unembedding (2 D V per token forward) runs in the vocab-blocked log-prob kernel, whose
    backward recomputes the logits (4x for the policy), plus one forward for the reference. With
    LoRA the base weights get no gradient: one matmul pass fewer for the layers and the
    unembedding (the rank-r adapters are not counted).
    """
    mc = model_config
    layer = _layer_weight_flops(mc) + 4 * seq_len * mc.n_heads * mc.head_dim
    passes = 3 - lora + (mc.remat == "full") + needs_ref
    unembed = 2 * mc.d_model * mc.vocab_size * (4 - lora + needs_ref)
    return float(tokens) * (passes * mc.n_layers * layer + unembed)


def rollout_flops(model_config, prompts: int, prompt_len: int, n: int, new: int) -> float:
    """Matmul FLOPs of one sampling call (`jaxalign.sampling.generate`), counted by hand.

    S = prompt_len + new cache slots, and every query attends over all S (the cache's static
    shape). Prefill: prompts x prompt_len tokens x L (2 P_layer + 4 S N H), plus the unembedding
    (2 D V) of each prompt's last position. Decode: prompts x n rows x new steps, each token
    L (2 P_layer + 4 S N H) + 2 D V. Rows that finished early keep running (static shapes), so
    this is also the count of a batch that stops early.
    """
    mc = model_config
    S = prompt_len + new
    layers = mc.n_layers * (_layer_weight_flops(mc) + 4 * S * mc.n_heads * mc.head_dim)
    unembed = 2 * mc.d_model * mc.vocab_size
    prefill = prompts * (prompt_len * layers + unembed)
    return float(prefill + prompts * n * new * (layers + unembed))


def _matmul_params(run) -> int:
    """Parameters that multiply every token: all but the embedding table when it is not tied
    (a lookup is no matmul)."""
    mc = run.model_config
    return models.param_count(mc) - (0 if mc.tie_embeddings else mc.vocab_size * mc.d_model)


def _model_flops_per_token(run) -> int:
    """6 (policy forward + backward; 4 with LoRA: no weight gradients) + 2 (reference forward,
    when the step runs it)."""
    return 6 - 2 * run.lora + 2 * _ref_in_step(run)


def _size(n: float) -> str:
    return f"{n / 2**30:9.2f} GiB" if n >= 2**30 else f"{n / 2**20:9.2f} MiB"


def compiler_versions(tpu: bool) -> str:
    """ "jax X" and, for a TPU topology, "libtpu Y": the plan's numbers depend on both."""
    out = f"jax {jax.__version__}"
    if tpu:
        try:
            out += f", libtpu {importlib.metadata.version('libtpu')}"
        except importlib.metadata.PackageNotFoundError:
            out += ", libtpu (version unknown)"
    return out


def compile_plan(config: ConfigDict, topology: str = "", *, echo: bool = True) -> dict[str, Any]:
    """Compile the config's train step without allocating anything; print and return the plan.

    Returns a dict: devices, device_kind, mesh (axis -> size), params, tokens_per_step,
    flops_per_device, flops_per_step (all devices), model_flops_per_step (6N per token for the
    policy's forward + backward plus 2N for the reference forward when the step runs it, N the
    parameters that multiply every token, attention and rematerialisation excluded: the
    yardstick for MFU), and memory per device in bytes: arguments, outputs, aliased,
    temporaries, generated_code, total (= arguments + outputs - aliased + temporaries +
    generated_code, the live peak XLA plans for).

    Online families: these describe one update (`rl.minibatches` x `rl.epochs` of them per
    step; `updates_per_step`), and `rollout` describes the sampling program of a step
    (`jaxalign.sampling.generate` on the same mesh, the params in their training shardings,
    data.batch_size prompts x rl.group_size rows, a cache of data.max_prompt_len +
    rl.max_new_tokens slots): memory as above, `resident` (bytes per device the program does
    not see but that stay allocated while it runs: the optimizer state and the reference
    weights), `peak` (total + resident), tokens (prompt + generated), flops_counted_per_device
    (XLA's count: the prefill and one decode step, each loop body once), analytic_flops (by
    hand, `rollout_flops`) and model_flops (2N per generated token, 2N less the unembedding
    per prompt token).
    """
    devices = topology_devices(topology) if topology else None
    run = setup(config, devices=devices, read_files=False)
    mesh_devices = run.mesh.devices.ravel()
    batch = abstract_batch(run)
    compiled = _compile(run)

    mem = _memory(compiled)
    n_devices = len(mesh_devices)
    counted = flops = _flops(compiled)
    outside = None
    layers = run.model_config.n_layers
    if layer_unroll(run.model_config.layer_loop, run.mesh):  # every layer is in the program
        flops = counted * config.optimizer.grad_accum
    elif layers >= 2:
        no_layers = dataclasses.replace(run.model_config, n_layers=0)
        outside = _flops(
            _compile(setup(config, devices=devices, model_config=no_layers, read_files=False))
        )
        flops = (outside + layers * (counted - outside)) * config.optimizer.grad_accum
    n_params = models.param_count(run.model_config)
    T = batch["tokens"].shape[-1]
    # Every token the step runs through the model: the batch's rows and a retain set's.
    tokens = sum(math.prod(v.shape) for k, v in batch.items() if k.split("/")[-1] == "tokens")
    ref = _ref_in_step(run)
    trained = sum(math.prod(x.shape) for x in jax.tree.leaves(run.abstract_state["params"]))
    plan = {
        "lora": run.lora,
        "trained_params": trained,
        "devices": n_devices,
        "device_kind": mesh_devices[0].device_kind,
        "topology": topology_name(topology) if topology else "",
        "compiler": compiler_versions(bool(topology)),
        "attention": models.attention.resolve(
            run.model_config.attention, config.data.max_len, run.mesh
        ),
        "mesh": dict(run.mesh.shape),
        "params": n_params,
        "tokens_per_step": tokens,
        "flops_per_device": flops,
        "flops_per_step": flops * n_devices,
        "flops_counted_per_device": counted,  # as XLA reports it: each loop body once
        "flops_outside_layers_per_device": outside,
        "model_flops_per_step": _model_flops_per_token(run) * _matmul_params(run) * tokens,
        "analytic_flops_per_step": analytic_flops(run.model_config, tokens, T, ref, run.lora),
        "memory": mem,
    }
    if _online(run):
        plan["updates_per_step"] = config.rl.minibatches * config.rl.epochs
        plan["rollout"] = _rollout_plan(run)
    if echo:
        print(format_plan(config, run, plan))
    return plan


def _rollout_plan(run) -> dict[str, Any]:
    config, rl = run.config, run.config.rl
    B, Tp = config.data.batch_size, config.data.max_prompt_len
    compiled = _compile_rollout(run)
    mem = _memory(compiled)
    state = run.abstract_target()
    resident = {"optimizer_state": _device_bytes(state["opt_state"])}
    if run.needs_ref:
        resident["reference"] = _device_bytes(state["params"])
    generated = B * rl.group_size * rl.max_new_tokens
    tokens = B * Tp + generated
    mc = run.model_config
    # The prefill unembeds each prompt's last position only.
    unembedding = mc.d_model * mc.vocab_size
    return {
        "prompts": B,
        "rows": B * rl.group_size,
        "cache_slots": Tp + rl.max_new_tokens,
        "tokens": tokens,
        "memory": mem,
        "resident": resident,
        "peak": mem["total"] + sum(resident.values()),
        "flops_counted_per_device": _flops(compiled),
        "analytic_flops": rollout_flops(mc, B, Tp, rl.group_size, rl.max_new_tokens),
        "model_flops": 2 * _matmul_params(run) * generated
        + 2 * (_matmul_params(run) - unembedding) * B * Tp,
    }


def _memory_lines(mem: dict) -> list[str]:
    return [
        f"  arguments     {_size(mem['arguments'])}",
        f"  outputs       {_size(mem['outputs'])}  ({_size(mem['aliased']).strip()} aliased to "
        "donated arguments)",
        f"  temporaries   {_size(mem['temporaries'])}",
        f"  generated code{_size(mem['generated_code'])}",
        f"  total         {_size(mem['total'])}  (arguments + outputs - aliased + temporaries + "
        "code)",
    ]


def format_plan(config: ConfigDict, run, plan: dict) -> str:
    mc = run.model_config
    where = f" (topology {plan['topology']})" if plan["topology"] else ""
    mesh = " ".join(f"{k}={v}" for k, v in plan["mesh"].items())
    spec = run.objective.batch
    unit = {"pair": "pairs", "rollout": "rows"}.get(spec.records, "examples")
    per_example = spec.sequences_per_example
    lines = [
        f"compile-only plan: trainer {config.trainer}, preset {config.model.preset}",
        f"devices         {plan['devices']} x {plan['device_kind']}{where}",
        f"compiler        {plan['compiler']}; attention {plan['attention']}",
        f"mesh            {mesh}, sharding {config.sharding}",
        f"model params    {plan['params']:,} ({plan['params'] / 1e9:.2f}B, {mc.param_dtype}); "
        f"activations {mc.dtype}, remat {mc.remat}"
        + ("; + frozen reference (same shardings)" if run.needs_ref and not run.lora else ""),
    ]
    if run.lora:
        lines.append(
            f"LoRA            rank {mc.lora.rank} on {', '.join(mc.lora.modules())}: "
            f"{plan['trained_params']:,} trained params; the frozen base is the reference"
        )
    if _online(run):
        lines += _rollout_lines(config, plan["rollout"])
        examples = update_examples(run)
        T = config.data.max_prompt_len + config.rl.max_new_tokens - 1
        lines += [
            f"update          one of {plan['updates_per_step']} per step (rl.minibatches x "
            f"rl.epochs): {examples} {unit} x {T} tokens ({examples * per_example} sequences, "
            f"grad_accum {config.optimizer.grad_accum})",
        ]
    else:
        padding = "packed" if config.data.pack else "padded"
        lines.append(
            f"batch           {config.data.batch_size} {unit}/step x {config.data.max_len} tokens"
            f" ({config.data.batch_size * per_example} sequences, "
            f"grad_accum {config.optimizer.grad_accum}, {padding})"
        )
    lines += [
        f"tokens/{'update' if _online(run) else 'step'}     {plan['tokens_per_step']:,}",
        "memory per device (compiled.memory_analysis()):",
        *_memory_lines(plan["memory"]),
        f"FLOPs/{'update' if _online(run) else 'step'}      {plan['flops_per_device']:.4g} per "
        f"device, {plan['flops_per_step']:.4g} total (compiled.cost_analysis(), layer loops "
        "counted L times)",
        f"  as counted    {plan['flops_counted_per_device']:.4g} per device with each loop body "
        f"once; {plan['flops_outside_layers_per_device'] or 0:.4g} outside the layers",
        f"by hand         {plan['analytic_flops_per_step']:.4g} (matmuls incl. "
        "attention, remat and kernel recomputation)",
        f"model FLOPs     {plan['model_flops_per_step']:.4g} per step "
        f"({_model_flops_per_token(run)}N per token; no attention, no remat: the MFU yardstick)",
    ]
    if plan["flops_per_step"] < plan["model_flops_per_step"]:
        # Below the lower bound: the compiler restructured a loop that its cost analysis then
        # skips (seen with the largest models under memory pressure).
        lines.append(
            "warning         XLA's count is below the model FLOPs, a lower bound: it misses part "
            "of the program; use the count by hand"
        )
    return "\n".join(lines)


def _rollout_lines(config: ConfigDict, rollout: dict) -> list[str]:
    resident = ", ".join(
        f"{k.replace('_', ' ')} {_size(v).strip()}" for k, v in rollout["resident"].items()
    )
    return [
        f"rollout         sampling.generate: {rollout['prompts']} prompts x rl.group_size "
        f"{config.rl.group_size} = {rollout['rows']} rows, cache of {rollout['cache_slots']} slots "
        f"({config.data.max_prompt_len} prompt + {config.rl.max_new_tokens} new); "
        f"{rollout['tokens']:,} tokens",
        "  memory per device (compiled.memory_analysis()):",
        *("  " + line for line in _memory_lines(rollout["memory"])),
        f"    resident    {resident} (allocated, not arguments)",
        f"    peak        {_size(rollout['peak'])}  (total + resident)",
        f"  FLOPs by hand {rollout['analytic_flops']:.4g} per step (prefill + every decode step "
        f"over all cache slots); model FLOPs {rollout['model_flops']:.4g} (2N per token)",
        f"  as counted    {rollout['flops_counted_per_device']:.4g} per device (XLA: the prefill "
        "and one decode step, each loop body once)",
    ]
