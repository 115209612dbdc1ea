"""Compile-only planning: `jaxalign train --config ... --compile_only [--topology v5p-64]`.

Builds the run's shardings for the config's preset, mesh and sharding preset, lowers and compiles
the real train step (`Setup.jit_train_step()`, donated state, explicit shardings) on abstract
inputs — `jax.ShapeDtypeStruct`s carrying their shardings, so no weight, optimizer slot or batch is
ever allocated — and prints what XLA reports for one device: memory (`compiled.memory_analysis()`)
and FLOPs (`compiled.cost_analysis()`), plus the parameter count and tokens per step.

Without `--topology` it compiles for this machine's devices (on CPU, e.g. the 8 fake devices of the
tests). With `--topology` it compiles ahead of time for a TPU slice that is not here, through
`jax.experimental.topologies.get_topology_desc`, which needs libtpu (`pip install 'jax[tpu]'`, the
`[tpu]` extra) but no TPU. Topology names:

    v5p-N, v4-N   N TensorCores, 2 per chip -> N/2 chips in the standard 3D slice shape:
                  4 chips 2x2x1, 8 2x2x2, 16 2x2x4, 32 2x4x4, 64 4x4x4, 128 4x4x8, 256 4x8x8, ...
                  (v5p-64 -> v5p:2x4x4, v5p-256 -> v5p:4x4x8)
    KIND:AxBxC    passed to libtpu as is, e.g. "v5p:2x4x4", "v5e:4x4"

FLOPs. The plan prints XLA's count, a count by hand (`analytic_flops`) and the model FLOPs
(6N + 2N per token). XLA's cost analysis counts the body of a while loop once, whatever its trip
count, and jaxalign scans its layers (forward, backward and the reference forward are each a
loop over the L layers), so `compiled.cost_analysis()["flops"]` alone undercounts by about L. The
plan also compiles the same step for the same model with no layers (R0, everything outside the
layer loops) and reports R0 + L (R_L - R0), the whole program for grad_accum = 1 (L >= 2). With
grad_accum A > 1 the first micro-batch is unrolled and the rest is one more loop, also counted
once, so the reported count is (A / 2) (R0 + L (R_L - R0)) (the optimizer update, < 0.1% of a
step, is then counted A / 2 times instead of once). Measured on TPU v5p, XLA's count is 89-94%
of the count by hand, except for Llama 3.1 70B at 4 sequences per v5p chip (37%: the count
matches the forward and reference loops alone, as if the compiler had restructured the backward
loop into a form its cost analysis skips). Below the model FLOPs, a lower bound, the plan prints
a warning.

The abstract batch has the pipeline's shapes at their largest: pad mode [A, R, T] with A =
`optimizer.grad_accum`, R = 2b rows for pairs (b for SFT), b = data.batch_size / A, T =
data.max_len; pack mode R = max(1, b * seqs_per_example // 2) rows of T = max_len; per-example
fields [A, b]. Rows are sharded exactly as `Setup.global_batch` shards them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from jaxalign import models, sharding
from jaxalign.errors import ConfigError

_CORES_PER_CHIP = {"v4": 2, "v5p": 2}


def _slice_shape_3d(chips: int) -> tuple[int, int, int]:
    """Standard 3D torus shape of a v4/v5p slice with `chips` chips (a power of two >= 4)."""
    if chips == 4:
        return (2, 2, 1)
    dims = [2, 2, 2]
    while math.prod(dims) < chips:
        smallest = min(dims)
        dims[max(i for i, d in enumerate(dims) if d == smallest)] *= 2
    return tuple(dims)


def topology_name(topology: str) -> str:
    """ "v5p-64" -> "v5p:2x4x4" (see the module docstring); "KIND:AxBxC" is returned as is."""
    if ":" in topology:
        return topology
    m = re.fullmatch(r"(v4|v5p)-(\d+)", topology)
    if m is None:
        raise ConfigError(
            f'--topology "{topology}": expected v5p-N or v4-N (N TensorCores), or KIND:AxBxC '
            'such as "v5p:2x4x4"'
        )
    kind, cores = m.group(1), int(m.group(2))
    chips = cores // _CORES_PER_CHIP[kind]
    if cores % _CORES_PER_CHIP[kind] or chips < 4 or chips & (chips - 1):
        raise ConfigError(
            f'--topology "{topology}": N counts TensorCores (2 per chip) and a {kind} slice has '
            f"a power-of-two number of chips >= 4: {kind}-8, {kind}-16, {kind}-32, ..."
        )
    dims = _slice_shape_3d(chips)
    return f"{kind}:{'x'.join(map(str, dims))}"


def topology_devices(topology: str) -> list:
    """The devices of a TPU slice described by name, for ahead-of-time compilation (libtpu)."""
    name = topology_name(topology)
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ConfigError(
            f'--topology "{topology}" compiles for TPU ahead of time and needs libtpu, which is '
            "not installed: pip install 'jax[tpu]' (jaxalign's [tpu] extra). Leave out --topology "
            "to compile for this machine's devices."
        ) from None
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # libtpu raises XlaRuntimeError/ValueError with its own message
        raise ConfigError(f'--topology "{topology}" (libtpu topology "{name}"): {e}') from None
    return list(desc.devices)


def abstract_batch(run) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of one train-step batch (leading micro-batch axis), sharded like
    `run.global_batch` shards the real one."""
    config = run.config
    if config.trainer not in ("sft", "dpo") or config.data.ref_logps or config.data.extra_fields:
        # Those batches carry more sequences or fields (KTO's mismatched pairs, cached reference
        # log-probs, data fields); planning them from shapes alone is not supported yet.
        raise ConfigError(
            f"--compile_only plans the sft and dpo trainers without data.ref_logps or "
            f"data.extra_fields; this config has trainer={config.trainer!r}"
        )
    accum = config.optimizer.grad_accum
    b = config.data.batch_size // accum
    per_example = 2 if config.trainer == "dpo" else 1
    T = config.data.max_len
    R = max(1, b * per_example // 2) if config.data.pack else b * per_example
    shards = math.prod(run.mesh.shape[a] for a in run.rules.mesh_axes("batch"))
    if b % shards or R % shards:
        raise ConfigError(
            f"a micro-batch of {b} examples in {R} rows (data.batch_size={config.data.batch_size}"
            f" / optimizer.grad_accum={accum}) does not split over the {shards} row shards of "
            f"mesh axes {run.rules.mesh_axes('batch')}: every device needs whole examples and rows"
        )

    def spec(shape, dtype):
        batch_axes = sharding.batch_spec(run.rules, len(shape) - 1)
        return jax.ShapeDtypeStruct(
            shape, dtype, sharding=NamedSharding(run.mesh, P(None, *batch_axes))
        )

    rows = {
        "tokens": jnp.int32,
        "targets": jnp.int32,
        "loss_mask": jnp.float32,
        "positions": jnp.int32,
        "segment_ids": jnp.int32,
        "seq_index": jnp.int32,
    }
    batch = {k: spec((accum, R, T), dtype) for k, dtype in rows.items()}
    batch["example_mask"] = spec((accum, b), jnp.float32)
    return batch


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
    from jaxalign.train.loop import setup

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
        flops = (outside + layers * (counted - outside)) * max(1, config.optimizer.grad_accum / 2)
    n_params = models.param_count(run.model_config)
    accum, rows, T = batch["tokens"].shape
    tokens = accum * rows * T
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
    unit = "pairs" if config.trainer == "dpo" else "sequences"
    per_example = 2 if config.trainer == "dpo" else 1
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
