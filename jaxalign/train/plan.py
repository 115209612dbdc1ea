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
layer loops) and reports R0 + L (R_L - R0), the whole program for grad_accum = 1 (L >= 2). With
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
import math
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from jaxalign import models, sharding
from jaxalign.data import layout
from jaxalign.errors import ConfigError
from jaxalign.sharding.topology import topology_devices, topology_name
from jaxalign.train.run import setup


def abstract_batch(run) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of one train-step batch (leading micro-batch axis) in the layout of the
    run's objective (`jaxalign.data.layout`), sharded like `run.global_batch` shards the real one.
    Shapes at their largest: pad mode R = B rows (B sequences), pack mode R = max(1, B // 2) rows,
    T = data.max_len."""
    config = run.config
    spec = run.objective.batch
    if config.data.extra_fields:
        # A list-valued field's width M (e.g. modpo's margins) is not known without the data.
        raise ConfigError(
            "--compile_only cannot shape data.extra_fields "
            f"{tuple(config.data.extra_fields)} without reading the data; plan without them"
        )
    accum = config.optimizer.grad_accum
    examples = config.data.batch_size // accum
    sequences = examples * spec.sequences_per_example
    rows = max(1, sequences // 2) if config.data.pack else sequences
    shards = math.prod(run.mesh.shape[a] for a in run.rules.mesh_axes("batch"))
    if examples % shards or rows % shards:
        raise ConfigError(
            f"a micro-batch of {examples} examples in {rows} rows (data.batch_size="
            f"{config.data.batch_size} / optimizer.grad_accum={accum}) does not split over the "
            f"{shards} row shards of mesh axes {run.rules.mesh_axes('batch')}: every device needs "
            "whole examples and rows"
        )

    def sharded(ndim):
        return NamedSharding(run.mesh, P(None, *sharding.batch_spec(run.rules, ndim - 1)))

    return layout.abstract(
        spec,
        examples=examples,
        rows=rows,
        T=config.data.max_len,
        micro_batches=accum,
        sharding=sharded,
    )


def _compile(run):
    """The run's jitted train step, compiled for abstract (sharded, unallocated) inputs."""
    ref = None
    if run.needs_ref:
        ref = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            run.abstract_state["params"],
            run.param_shardings,
        )
    step = run.jit_train_step()
    return step.lower(run.abstract_target(), ref, abstract_batch(run)).compile()


def _flops(compiled) -> float:
    """FLOPs of one device's program as XLA counts them (loop bodies once)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def analytic_flops(model_config, tokens: int, seq_len: int, needs_ref: bool) -> float:
    """Matmul FLOPs of one train step as the model computes them, counted by hand.

    Per token and layer, forward: 2 P_layer (P_layer = D(NH + 2KH) + NHD + 3DF, the projection and
    MLP weights) + 4 T N H (scores and values over all T columns: the attention materialises full
    masked [T, T] scores). The policy runs forward + backward (3x) plus one more forward of the
    layers under remat "full"; the reference one forward. The unembedding (2 D V per token forward)
    runs in the vocab-blocked log-prob kernel, whose backward recomputes the logits (4x for the
    policy), plus one forward for the reference.
    """
    mc = model_config
    d, h = mc.d_model, mc.head_dim
    layer = 2 * (d * (mc.n_heads + 2 * mc.n_kv_heads) * h + mc.n_heads * h * d + 3 * d * mc.d_ff)
    layer += 4 * seq_len * mc.n_heads * h
    passes = 3 + (mc.remat == "full") + needs_ref
    unembed = 2 * d * mc.vocab_size * (4 + needs_ref)
    return float(tokens) * (passes * mc.n_layers * layer + unembed)


def _matmul_params(run) -> int:
    """Parameters that multiply every token: all but the embedding table when it is not tied
    (a lookup is no matmul)."""
    mc = run.model_config
    return models.param_count(mc) - (0 if mc.tie_embeddings else mc.vocab_size * mc.d_model)


def _size(n: float) -> str:
    return f"{n / 2**30:9.2f} GiB" if n >= 2**30 else f"{n / 2**20:9.2f} MiB"


def compile_plan(config: ConfigDict, topology: str = "", *, echo: bool = True) -> dict[str, Any]:
    """Compile the config's train step without allocating anything; print and return the plan.

    Returns a dict: devices, device_kind, mesh (axis -> size), params, tokens_per_step,
    flops_per_device, flops_per_step (all devices), model_flops_per_step (6N per token for the
    policy's forward + backward plus 2N for the reference forward, N the parameters that multiply
    every token, attention and rematerialisation excluded: the yardstick for MFU), and memory
    per device in bytes: arguments, outputs, aliased, temporaries, generated_code, total
    (= arguments + outputs - aliased + temporaries + generated_code, the live peak XLA plans for).
    """
    devices = topology_devices(topology) if topology else None
    run = setup(config, devices=devices, read_files=False)
    mesh_devices = run.mesh.devices.ravel()
    batch = abstract_batch(run)
    compiled = _compile(run)

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
    n_devices = len(mesh_devices)
    counted = flops = _flops(compiled)
    outside = None
    layers = run.model_config.n_layers
    if layers >= 2:
        no_layers = dataclasses.replace(run.model_config, n_layers=0)
        outside = _flops(
            _compile(setup(config, devices=devices, model_config=no_layers, read_files=False))
        )
        flops = (outside + layers * (counted - outside)) * config.optimizer.grad_accum
    n_params = models.param_count(run.model_config)
    T = batch["tokens"].shape[-1]
    # Every token the step runs through the model: the batch's rows and a retain set's.
    tokens = sum(math.prod(v.shape) for k, v in batch.items() if k.split("/")[-1] == "tokens")
    plan = {
        "devices": n_devices,
        "device_kind": mesh_devices[0].device_kind,
        "topology": topology_name(topology) if topology else "",
        "mesh": dict(run.mesh.shape),
        "params": n_params,
        "tokens_per_step": tokens,
        "flops_per_device": flops,
        "flops_per_step": flops * n_devices,
        "flops_counted_per_device": counted,  # as XLA reports it: each loop body once
        "flops_outside_layers_per_device": outside,
        "model_flops_per_step": (6 + 2 * run.needs_ref) * _matmul_params(run) * tokens,
        "analytic_flops_per_step": analytic_flops(run.model_config, tokens, T, run.needs_ref),
        "memory": mem,
    }
    if echo:
        print(format_plan(config, run, plan))
    return plan


def format_plan(config: ConfigDict, run, plan: dict) -> str:
    mc = run.model_config
    where = f" (topology {plan['topology']})" if plan["topology"] else ""
    mesh = " ".join(f"{k}={v}" for k, v in plan["mesh"].items())
    spec = run.objective.batch
    unit = "pairs" if spec.records == "pair" else "examples"
    per_example = spec.sequences_per_example
    mem = plan["memory"]
    lines = [
        f"compile-only plan: trainer {config.trainer}, preset {config.model.preset}",
        f"devices         {plan['devices']} x {plan['device_kind']}{where}",
        f"mesh            {mesh}, sharding {config.sharding}",
        f"model params    {plan['params']:,} ({plan['params'] / 1e9:.2f}B, {mc.param_dtype}); "
        f"activations {mc.dtype}, remat {mc.remat}"
        + ("; + frozen reference (same shardings)" if run.needs_ref else ""),
        f"batch           {config.data.batch_size} {unit}/step x {config.data.max_len} tokens"
        f" ({config.data.batch_size * per_example} sequences, "
        f"grad_accum {config.optimizer.grad_accum}, {'packed' if config.data.pack else 'padded'})",
        f"tokens/step     {plan['tokens_per_step']:,}",
        "memory per device (compiled.memory_analysis()):",
        f"  arguments     {_size(mem['arguments'])}",
        f"  outputs       {_size(mem['outputs'])}  ({_size(mem['aliased']).strip()} aliased to "
        "donated arguments)",
        f"  temporaries   {_size(mem['temporaries'])}",
        f"  generated code{_size(mem['generated_code'])}",
        f"  total         {_size(mem['total'])}  (arguments + outputs - aliased + temporaries + "
        "code)",
        f"FLOPs/step      {plan['flops_per_device']:.4g} per device, "
        f"{plan['flops_per_step']:.4g} total (compiled.cost_analysis(), layer loops counted "
        "L times)",
        f"  as counted    {plan['flops_counted_per_device']:.4g} per device with each loop body "
        f"once; {plan['flops_outside_layers_per_device'] or 0:.4g} outside the layers",
        f"by hand         {plan['analytic_flops_per_step']:.4g} per step (matmuls incl. "
        "attention, remat and kernel recomputation)",
        f"model FLOPs     {plan['model_flops_per_step']:.4g} per step "
        f"({6 + 2 * run.needs_ref}N per token; no attention, no remat: the MFU yardstick)",
    ]
    if plan["flops_per_step"] < plan["model_flops_per_step"]:
        # Below the lower bound: the compiler restructured a loop that its cost analysis then
        # skips (seen with the largest models under memory pressure).
        lines.append(
            "warning         XLA's count is below the model FLOPs, a lower bound: it misses part "
            "of the program; use the count by hand"
        )
    return "\n".join(lines)
