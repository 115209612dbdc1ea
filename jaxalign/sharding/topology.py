"""TPU slice topologies by name, for ahead-of-time compilation on a machine without the TPU.

    v5p-N, v4-N   N TensorCores, 2 per chip -> N/2 chips in the standard 3D slice shape:
                  4 chips 2x2x1, 8 2x2x2, 16 2x2x4, 32 2x4x4, 64 4x4x4, 128 4x4x8, 256 4x8x8, ...
                  (v5p-64 -> v5p:2x4x4, v5p-256 -> v5p:4x4x8)
    KIND:AxBxC    passed to libtpu as is, e.g. "v5p:2x4x4", "v5e:4x4"

`topology_devices(name)` needs libtpu (`pip install 'jax[tpu]'`, jaxalign's `[tpu]` extra) but no
TPU (`jax.experimental.topologies.get_topology_desc`).
"""

from __future__ import annotations

import math
import re

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
