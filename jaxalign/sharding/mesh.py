"""Device meshes with the three jaxalign axes ("data", "fsdp", "tensor").

Axis meaning:
  data    pure data parallelism: parameters replicated, batch rows split. On a multi-slice TPU run
          this is the axis that crosses the data-centre network (DCN), because it only all-reduces
          gradients once per step.
  fsdp    fully sharded data parallelism (ZeRO-3): batch rows split *and* parameters/optimizer
          state split along their largest dimension, all-gathered just in time inside the step.
  tensor  Megatron tensor parallelism: heads / mlp / vocab dimensions split; needs the fast
          intra-slice interconnect.

Single slice: `make_mesh({"fsdp": -1})` uses `mesh_utils.create_device_mesh`, which orders devices
along the physical TPU torus (on CPU/GPU it is a plain reshape).

Multi-slice (several TPU slices joined by DCN): pass `dcn_shape`, e.g. 2 slices of v5p-128:
`make_mesh({"fsdp": -1}, dcn_shape={"data": 2})`. `shape` is then the per-slice (ICI) shape and the
mesh axis sizes are the products ICI x DCN per axis, built with
`mesh_utils.create_hybrid_device_mesh`, which groups devices by their `slice_index` so that only
the DCN axes cross slices. GPU and CPU devices are grouped by process (host) instead, so on a
GPU cluster `dcn_shape={"data": n_hosts}` keeps fsdp/tensor inside each host (NVLink) and only
data parallelism crosses the network.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
DEFAULT_SHAPE: dict[str, int] = {"data": 1, "fsdp": -1, "tensor": 1}

_log = logging.getLogger(__name__)


def resolve_shape(
    shape: Mapping[str, int], n_devices: int, *, what: str = "mesh"
) -> tuple[int, ...]:
    """Axis sizes in `AXES` order for `n_devices` devices; a single -1 takes the remaining devices.

    Missing axes default to 1. Raises ValueError (naming the shape and the device count) for
    unknown axis names, sizes other than positive integers or -1, more than one -1, or a product
    that does not equal (or, with -1, does not divide) `n_devices`.
    """
    unknown = sorted(set(shape) - set(AXES))
    if unknown:
        raise ValueError(
            f"{what} shape {dict(shape)} has unknown axes {unknown}; mesh axes are {AXES}"
        )
    sizes = [int(shape.get(axis, 1)) for axis in AXES]
    bad = [axis for axis, s in zip(AXES, sizes, strict=True) if s < 1 and s != -1]
    if bad:
        raise ValueError(
            f"{what} shape {dict(shape)}: sizes must be positive or -1, got bad axes {bad}"
        )
    if sizes.count(-1) > 1:
        raise ValueError(f"{what} shape {dict(shape)}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(
                f"{what} shape {dict(shape)}: the fixed axes (product {known}) do not divide "
                f"the {n_devices} devices"
            )
        sizes[sizes.index(-1)] = n_devices // known
    elif known != n_devices:
        raise ValueError(
            f"{what} shape {dict(shape)} has {known} devices in total but {n_devices} devices "
            "are available"
        )
    return tuple(sizes)


def _granules(devices: Sequence[jax.Device]) -> tuple[int, bool]:
    """(number of DCN granules, whether they are processes rather than TPU slices)."""
    if devices[0].platform == "tpu":
        return len({d.slice_index for d in devices}), False
    return len({d.process_index for d in devices}), True


def make_mesh(
    shape: Mapping[str, int] | None = None,
    *,
    dcn_shape: Mapping[str, int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a `Mesh` with axes ("data", "fsdp", "tensor").

    Args:
      shape: axis -> size, default {"data": 1, "fsdp": -1, "tensor": 1}; -1 fills with the remaining
        devices. With `dcn_shape` this is the per-slice shape.
      dcn_shape: axis -> number of slices (or hosts, see above) along that axis; -1 fills with
        their number. The product must divide the device count.
      devices: defaults to `jax.devices()` (all devices of all processes).

    All axes use `AxisType.Auto` (GSPMD propagation), so shardings are set by jit in/out shardings
    and `with_sharding_constraint`.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = DEFAULT_SHAPE if shape is None else shape
    n = len(devices)
    if dcn_shape is None:
        sizes = resolve_shape(shape, n)
        try:
            grid = mesh_utils.create_device_mesh(sizes, devices)
        except (ValueError, NotImplementedError, AssertionError) as err:
            # The physical-topology-aware assignment only supports shapes that map onto whole torus
            # axes; other shapes are still valid, just with a less local device order.
            _log.warning(
                "mesh %s does not map onto the device topology (%s); splitting axes", sizes, err
            )
            grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    else:
        n_granules, per_process = _granules(devices)
        if -1 in dcn_shape.values():
            dcn_total = n_granules
        else:
            dcn_total = math.prod(int(v) for v in dcn_shape.values())
        dcn = resolve_shape(dcn_shape, dcn_total, what="dcn")
        n_dcn = math.prod(dcn)
        if n % n_dcn:
            raise ValueError(
                f"dcn shape {dict(dcn_shape)} ({n_dcn} slices) does not divide the {n} devices"
            )
        ici = resolve_shape(shape, n // n_dcn, what="per-slice (ici)")
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=per_process
        )
    return Mesh(np.asarray(grid), AXES, axis_types=(AxisType.Auto,) * len(AXES))
