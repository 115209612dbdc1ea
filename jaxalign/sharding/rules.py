"""Sharding rules: logical axis name -> mesh axis, tuple of mesh axes, or None (replicated).

Parameters carry logical axis names from `jaxalign.models.param_logical_axes(config)` ("layers",
"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp"); activations and batches use "batch",
"seq", "act_embed" (model width of an activation) plus the same
"heads"/"kv_heads"/"head_dim"/"mlp"/"vocab".

Why "act_embed" is separate from "embed": under FSDP the parameter model dimension is split over
"fsdp" while activation rows are split over ("data", "fsdp"); an activation [B, T, D] annotated
("batch", "seq", "embed") would put "fsdp" on two dimensions. Activations are therefore annotated
("batch", "seq", "act_embed"), which every preset leaves replicated.

Presets (`ShardingRules.preset(name)`):

  name     | batch            | embed  | heads, kv_heads, mlp, vocab | everything else
  ---------|------------------|--------|-----------------------------|----------------
  dp       | ("data", "fsdp") | None   | None                        | None
  fsdp     | ("data", "fsdp") | "fsdp" | None                        | None
  fsdp_tp  | ("data", "fsdp") | "fsdp" | "tensor"                    | None

"dp" splits rows over ("data", "fsdp") too: on a pure data-parallel mesh fsdp has size 1 and this is
"batch over data"; on a mesh with fsdp > 1 it still gives every device distinct rows instead of
repeating the same computation. Only embed is FSDP-sharded because every weight matrix but the
norms has a D dimension (the norms and biases are tiny and stay replicated); the stacked "layers"
axis is never sharded (that would be pipeline parallelism, which jaxalign does not do).

Dimensions not divisible by their mesh axes (e.g. 2 kv heads over tensor=4, GQA): when shapes are
known (`named_shardings(..., shapes_tree)`, `logical_to_spec(..., shape=, mesh=)`,
`with_logical_constraint`), such a dimension keeps the longest prefix of its mesh axes whose size
product divides it, which for a single mesh axis means it is replicated. This is what Megatron-style
tensor parallelism does for GQA when kv_heads < tensor: every tensor rank holds the whole (small)
K/V projection and computes the K/V heads its own query heads need. The alternative, uneven
sharding with padding, wastes memory on padding and makes XLA insert resharding collectives around
every use. Each such dimension is logged as a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign.sharding.mesh import AXES

MeshAxes = str | tuple[str, ...] | None

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Maps each logical axis to mesh axes; the default instance is the "dp" preset.

    Frozen and hashable, so it can be a static argument of `jax.jit`. Lists given to the
    constructor are stored as tuples. Build variants with `dataclasses.replace(rules, vocab=None)`.
    """

    batch: MeshAxes = ("data", "fsdp")
    seq: MeshAxes = None
    act_embed: MeshAxes = None
    layers: MeshAxes = None
    vocab: MeshAxes = None
    embed: MeshAxes = None
    heads: MeshAxes = None
    kv_heads: MeshAxes = None
    head_dim: MeshAxes = None
    mlp: MeshAxes = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            target = _normalize(getattr(self, field.name), field.name)
            object.__setattr__(self, field.name, target)

    @classmethod
    def preset(cls, name: str) -> ShardingRules:
        """The named presets "dp", "fsdp", "fsdp_tp" (table in the module docstring)."""
        presets = {
            "dp": cls(),
            "fsdp": cls(embed="fsdp"),
            "fsdp_tp": cls(
                embed="fsdp", heads="tensor", kv_heads="tensor", mlp="tensor", vocab="tensor"
            ),
        }
        if name not in presets:
            raise ValueError(f"unknown sharding preset {name!r}; expected one of {sorted(presets)}")
        return presets[name]

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any], base: str = "dp") -> ShardingRules:
        """Preset `base` overridden by a (config) mapping; unknown logical names raise."""
        rules = cls.preset(base)
        unknown = sorted(set(mapping) - set(cls.logical_axes()))
        if unknown:
            raise ValueError(
                f"unknown logical axes {unknown}; expected some of {cls.logical_axes()}"
            )
        return dataclasses.replace(rules, **dict(mapping))

    @classmethod
    def logical_axes(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def mesh_axes(self, logical: str) -> tuple[str, ...]:
        """Mesh axes of one logical axis as a (possibly empty) tuple; unknown names raise."""
        if logical not in self.logical_axes():
            raise ValueError(
                f"unknown logical axis {logical!r}; ShardingRules knows {self.logical_axes()}"
            )
        target = getattr(self, logical)
        if target is None:
            return ()
        return (target,) if isinstance(target, str) else target


def _normalize(target: Any, name: str) -> MeshAxes:
    if target is None or isinstance(target, str):
        axes = () if target is None else (target,)
    else:
        axes = tuple(target)
    bad = [a for a in axes if a not in AXES]
    if bad:
        raise ValueError(
            f"logical axis {name!r} maps to unknown mesh axes {bad}; mesh axes are {AXES}"
        )
    if len(set(axes)) != len(axes):
        raise ValueError(f"logical axis {name!r} lists a mesh axis twice: {axes}")
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def _fit(axes: tuple[str, ...], dim: int, mesh_shape: Mapping[str, int]) -> tuple[str, ...]:
    """Longest prefix of `axes` whose total size divides `dim`."""
    for k in range(len(axes), 0, -1):
        if dim % math.prod(mesh_shape[a] for a in axes[:k]) == 0:
            return axes[:k]
    return ()


def logical_to_spec(
    axes: Sequence[str | None],
    rules: ShardingRules,
    *,
    shape: Sequence[int] | None = None,
    mesh: Mesh | Mapping[str, int] | None = None,
    name: str = "array",
) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have logical names `axes` (None = replicated).

    Raises ValueError when two dimensions would use the same mesh axis (naming both logical axes),
    or for an unknown logical name. With `shape` and `mesh` (a Mesh or its axis-size mapping),
    dimensions not divisible by their mesh axes fall back as described in the module docstring.
    """
    axes = tuple(axes)
    if shape is not None and len(shape) != len(axes):
        raise ValueError(
            f"{name}: logical axes {axes} have rank {len(axes)} but shape is {tuple(shape)}"
        )
    mesh_shape = None if mesh is None else dict(mesh if isinstance(mesh, Mapping) else mesh.shape)
    used: dict[str, str] = {}
    entries: list[MeshAxes] = []
    for i, logical in enumerate(axes):
        mapped = () if logical is None else rules.mesh_axes(logical)
        if shape is not None and mesh_shape is not None and mapped:
            fitted = _fit(mapped, int(shape[i]), mesh_shape)
            if fitted != mapped:
                _log.warning(
                    "%s: dim %d (%s, size %d) is not divisible by mesh axes %s %s; sharding it "
                    "over %s",
                    name,
                    i,
                    logical,
                    shape[i],
                    mapped,
                    tuple(mesh_shape[a] for a in mapped),
                    fitted or "nothing (replicated)",
                )
            mapped = fitted
        for mesh_axis in mapped:
            if mesh_axis in used:
                raise ValueError(
                    f"{name}: logical axes {used[mesh_axis]!r} and {logical!r} (of {axes}) both "
                    f"map to mesh axis {mesh_axis!r}; a mesh axis can shard only one dimension "
                    "of a tensor"
                )
            used[mesh_axis] = logical
        entries.append(None if not mapped else mapped[0] if len(mapped) == 1 else mapped)
    return PartitionSpec(*entries)


def is_logical_axes(x: Any) -> bool:
    """True for a leaf of a logical-axes tree: a tuple of str/None (the empty tuple for scalars)."""
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(x)


def named_shardings(
    mesh: Mesh, rules: ShardingRules, logical_axes_tree: Any, shapes_tree: Any = None
):
    """Tree of `NamedSharding`s matching `logical_axes_tree` (leaves: tuples of logical names).

    `shapes_tree` (same structure; leaves are arrays, `jax.ShapeDtypeStruct`s, e.g. from
    `jax.eval_shape`, or shape tuples) enables the non-divisible fallback; without it specs are
    used as written.
    """

    def one(path, axes, shape=None):
        name = jax.tree_util.keystr(path)
        spec = logical_to_spec(
            axes, rules, shape=None if shape is None else _shape_of(shape), mesh=mesh, name=name
        )
        return NamedSharding(mesh, spec)

    if shapes_tree is None:
        return jax.tree_util.tree_map_with_path(one, logical_axes_tree, is_leaf=is_logical_axes)
    return jax.tree_util.tree_map_with_path(
        one, logical_axes_tree, shapes_tree, is_leaf=is_logical_axes
    )


def shard_params(params: Any, mesh: Mesh, rules: ShardingRules, logical_axes: Any) -> Any:
    """`jax.device_put` of a host/device params tree onto its sharded layout.

    For large models prefer initialising under `jax.jit(init, out_shardings=named_shardings(...,
    jax.eval_shape(init, ...)))`, which never materialises full weights on one device.
    """
    return jax.device_put(params, named_shardings(mesh, rules, logical_axes, params))


def with_logical_constraint(
    x: jax.Array, axes: Sequence[str | None], rules: ShardingRules, mesh: Mesh | None = None
) -> jax.Array:
    """`jax.lax.with_sharding_constraint` by logical names, for activations inside jit.

    Uses `mesh` if given, else the mesh made active with `jax.set_mesh(mesh)`; with neither it
    returns `x` unchanged, so model code runs unsharded on one device. Non-divisible dimensions
    fall back as in `logical_to_spec` (x.shape is static under jit).
    """
    if mesh is None:
        active = jax.sharding.get_abstract_mesh()
        if active.empty:
            return x
        spec = logical_to_spec(axes, rules, shape=x.shape, mesh=active, name="activation")
        return jax.lax.with_sharding_constraint(x, spec)
    spec = logical_to_spec(axes, rules, shape=x.shape, mesh=mesh, name="activation")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_spec(rules: ShardingRules, ndim: int = 2) -> PartitionSpec:
    """PartitionSpec for batch arrays: rows [R, ...] over `rules.batch`, other dims replicated."""
    return logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, name="batch")


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding (scalars, step counters, RNG keys)."""
    return NamedSharding(mesh, PartitionSpec())


def _local_row_shards(mesh: Mesh, batch_axes: tuple[str, ...]) -> int:
    """Number of distinct row shards (coordinates along `batch_axes`) on this process's devices."""
    positions = [mesh.axis_names.index(a) for a in batch_axes]
    me = jax.process_index()
    return len(
        {
            tuple(idx[p] for p in positions)
            for idx, device in np.ndenumerate(mesh.devices)
            if device.process_index == me
        }
    )


def to_global(
    batch_np: Mapping[str, Any], mesh: Mesh, rules: ShardingRules, *, row_axis: int = 0
) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global `jax.Array`s with rows sharded by `batch_spec(rules)`.

    Every process passes its own rows (its slice of the global batch, e.g. from the Grain per-host
    shard); `jax.make_array_from_process_local_data` stitches them, so global rows = local rows x
    (row shards / row shards on this process). 0-d fields are replicated (every process must pass
    the same value). `row_axis=1` leaves a leading axis unsharded (the trainer's micro-batch
    axis). Raises ValueError, naming the field, when the local rows cannot be split evenly over
    this process's row shards.
    """
    batch_axes = rules.mesh_axes("batch")
    n_shards = math.prod(mesh.shape[a] for a in batch_axes)
    n_local = _local_row_shards(mesh, batch_axes)
    out = {}
    for key, value in batch_np.items():
        arr = np.asarray(value)
        if arr.ndim <= row_axis:
            out[key] = jax.make_array_from_process_local_data(replicated(mesh), arr, arr.shape)
            continue
        rows = arr.shape[row_axis]
        if rows % n_local:
            raise ValueError(
                f"batch field {key!r}: this process has {rows} rows (shape {arr.shape}), not "
                f"divisible by its {n_local} row shards (mesh axes {batch_axes} = {n_shards} "
                "shards in total)"
            )
        global_shape = (
            *arr.shape[:row_axis],
            rows // n_local * n_shards,
            *arr.shape[row_axis + 1 :],
        )
        spec = PartitionSpec(*(None,) * row_axis, *batch_spec(rules, arr.ndim - row_axis))
        sharding = NamedSharding(mesh, spec)
        out[key] = jax.make_array_from_process_local_data(sharding, arr, global_shape)
    return out
