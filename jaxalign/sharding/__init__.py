"""Meshes, logical-axis sharding rules, batch/param/activation sharding helpers, multi-host init.

Typical use (see DESIGN.md decision 5):

    jaxalign.sharding.initialize()         # before any other JAX call; no-op on one host
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    rules = ShardingRules.preset("fsdp")
    shapes = jax.eval_shape(init, ...)
    param_shardings = named_shardings(mesh, rules, param_logical_axes(cfg), shapes)
    batch = to_global(host_batch, mesh, rules)  # process-local numpy rows -> global arrays
"""

from jaxalign.sharding.distributed import ClusterSpec, detect_cluster, initialize, parse_nodelist
from jaxalign.sharding.mesh import AXES, DEFAULT_SHAPE, make_mesh, resolve_shape
from jaxalign.sharding.rules import (
    ShardingRules,
    batch_spec,
    is_logical_axes,
    logical_to_spec,
    named_shardings,
    replicated,
    shard_params,
    to_global,
    with_logical_constraint,
)

__all__ = [
    "AXES",
    "DEFAULT_SHAPE",
    "ClusterSpec",
    "ShardingRules",
    "batch_spec",
    "detect_cluster",
    "initialize",
    "is_logical_axes",
    "logical_to_spec",
    "make_mesh",
    "named_shardings",
    "parse_nodelist",
    "replicated",
    "resolve_shape",
    "shard_params",
    "to_global",
    "with_logical_constraint",
]
