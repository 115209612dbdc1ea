"""Multi-process (multi-host) start-up: `initialize()` wraps `jax.distributed.initialize`.

Call it first thing in a process, before any other JAX call (the CLI does). The cluster comes from,
in order of precedence:

1. explicit arguments (`coordinator_address`, `num_processes`, `process_id`), which override fields
   detected below;
2. generic environment variables JAXALIGN_COORDINATOR ("host:port"), JAXALIGN_NUM_PROCESSES,
   JAXALIGN_PROCESS_ID (all three), for any launcher (mpirun, torchrun-style wrappers, k8s);
3. SLURM, inside `srun` (SLURM_JOB_ID and SLURM_PROCID set): processes = SLURM_STEP_NUM_TASKS (else
   SLURM_NTASKS), id = SLURM_PROCID, coordinator = first host of SLURM_STEP_NODELIST (else
   SLURM_JOB_NODELIST) on port JAXALIGN_COORDINATOR_PORT, else JAX_COORDINATOR_PORT, else
   61440 + SLURM_JOB_ID % 4096 (jax's own choice: different jobs sharing a node get different
   ports). With several tasks per node (one per GPU), each task gets
   `local_device_ids=[SLURM_LOCALID]`, unless SLURM already restricted CUDA_VISIBLE_DEVICES to one
   GPU per task;
4. Cloud TPU VM (a TPU chip on PCI, or TPU_* / MEGASCALE_* variables):
   `jax.distributed.initialize()` with no arguments, which reads the worker list and this worker's
   id from the TPU metadata server (and the multi-slice MEGASCALE_* settings).

Nothing found, or one process: no-op. JAXALIGN_DISTRIBUTED=0 forces the no-op (e.g. debugging on a
single worker of a pod).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax

_log = logging.getLogger(__name__)

_TPU_ENV_HINTS = (
    "TPU_WORKER_HOSTNAMES",
    "TPU_WORKER_ID",
    "TPU_ACCELERATOR_TYPE",
    "MEGASCALE_COORDINATOR_ADDRESS",
)
_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips v3, v4, v5p, v5e, v6e, 7x (the table jax's own detection uses).
_TPU_PCI_DEVICE_IDS = frozenset({"0x0027", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"})


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """Arguments for `jax.distributed.initialize`; None fields are left to JAX (TPU metadata)."""

    source: str  # "explicit" | "env" | "slurm" | "tpu"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    def kwargs(self) -> dict:
        out = {
            "coordinator_address": self.coordinator_address,
            "num_processes": self.num_processes,
            "process_id": self.process_id,
            "local_device_ids": None
            if self.local_device_ids is None
            else list(self.local_device_ids),
        }
        return {k: v for k, v in out.items() if v is not None}


def _expand_host(token: str) -> list[str]:
    """Expands one SLURM host expression, e.g. "gpu[01-03,07]" or "rack[1-2]-n[1-2]"."""
    open_at = token.find("[")
    if open_at < 0:
        return [token]
    close_at = token.index("]", open_at)
    prefix, body, rest = token[:open_at], token[open_at + 1 : close_at], token[close_at + 1 :]
    items = []
    for part in body.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            items += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
        else:
            items.append(part)
    return [prefix + item + tail for item in items for tail in _expand_host(rest)]


def parse_nodelist(nodelist: str) -> list[str]:
    """SLURM compressed host list -> names: "node[001-003],gpu7" -> node001..node003, gpu7."""
    tokens, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            tokens.append(nodelist[start:i])
            start = i + 1
    tokens.append(nodelist[start:])
    try:
        return [host for tok in tokens if tok.strip() for host in _expand_host(tok.strip())]
    except ValueError as err:
        raise ValueError(f"cannot parse SLURM nodelist {nodelist!r}: {err}") from err


def parse_tasks_per_node(value: str) -> list[int]:
    """SLURM_TASKS_PER_NODE format -> per-node counts, e.g. "4(x2),3" -> [4, 4, 3]."""
    counts = []
    for part in value.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise ValueError(f"cannot parse SLURM tasks-per-node {value!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _from_generic(env: Mapping[str, str]) -> ClusterSpec | None:
    names = ("JAXALIGN_COORDINATOR", "JAXALIGN_NUM_PROCESSES", "JAXALIGN_PROCESS_ID")
    present = [n for n in names if env.get(n)]
    if not present:
        return None
    if len(present) != len(names):
        missing = [n for n in names if n not in present]
        raise ValueError(f"{present} set but {missing} missing; set all of {list(names)}")
    return ClusterSpec(
        source="env",
        coordinator_address=env["JAXALIGN_COORDINATOR"],
        num_processes=int(env["JAXALIGN_NUM_PROCESSES"]),
        process_id=int(env["JAXALIGN_PROCESS_ID"]),
    )


def _from_slurm(env: Mapping[str, str]) -> ClusterSpec | None:
    if "SLURM_JOB_ID" not in env or "SLURM_PROCID" not in env:
        return None
    num = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    nodelist = (
        env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    )
    if not nodelist:
        raise ValueError(
            "SLURM job without SLURM_STEP_NODELIST/SLURM_JOB_NODELIST: cannot find the coordinator"
        )
    port = (
        env.get("JAXALIGN_COORDINATOR_PORT")
        or env.get("JAX_COORDINATOR_PORT")
        or str(61440 + int(env["SLURM_JOB_ID"]) % 4096)
    )
    tasks_spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    tasks_here = 1
    if tasks_spec:
        per_node = parse_tasks_per_node(tasks_spec)
        tasks_here = per_node[min(int(env.get("SLURM_NODEID", 0)), len(per_node) - 1)]
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    local_ids = None
    if tasks_here > 1 and len(visible) != 1 and "SLURM_LOCALID" in env:
        local_ids = (int(env["SLURM_LOCALID"]),)
    return ClusterSpec(
        source="slurm",
        coordinator_address=f"{parse_nodelist(nodelist)[0]}:{port}",
        num_processes=num,
        process_id=int(env["SLURM_PROCID"]),
        local_device_ids=local_ids,
    )


def detect_cluster(
    env: Mapping[str, str],
    *,
    on_tpu_vm: bool = False,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> ClusterSpec | None:
    """Pure detection logic of `initialize` (see the module docstring); None: single process."""
    if env.get("JAXALIGN_DISTRIBUTED", "").strip().lower() in ("0", "false", "no", "off"):
        return None
    spec = _from_generic(env) or _from_slurm(env)
    if spec is None and (on_tpu_vm or any(env.get(k) for k in _TPU_ENV_HINTS)):
        spec = ClusterSpec(source="tpu")
    explicit = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    explicit = {k: v for k, v in explicit.items() if v is not None}
    if explicit:
        spec = dataclasses.replace(spec or ClusterSpec(source="explicit"), **explicit)
        missing = [
            k
            for k in ("coordinator_address", "num_processes", "process_id")
            if getattr(spec, k) is None
        ]
        if spec.source != "tpu" and missing:
            raise ValueError(
                f"distributed initialize: {missing} not given and not found in the environment"
            )
    if spec is None or spec.num_processes == 1:
        return None
    known = spec.num_processes is not None and spec.process_id is not None
    if known and not 0 <= spec.process_id < spec.num_processes:
        raise ValueError(
            f"process_id {spec.process_id} out of range for {spec.num_processes} processes "
            f"({spec.source})"
        )
    return spec


def running_on_tpu_vm() -> bool:
    """True when a TPU chip is attached (/dev/accel*, or a Google PCI device with a TPU id)."""
    if glob.glob("/dev/accel*"):
        return True
    for dev in glob.glob("/sys/bus/pci/devices/*"):
        try:
            vendor = Path(dev, "vendor").read_text().strip()
            device = Path(dev, "device").read_text().strip()
        except OSError:
            continue
        if vendor == _GOOGLE_PCI_VENDOR and device in _TPU_PCI_DEVICE_IDS:
            return True
    return False


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> ClusterSpec | None:
    """Starts `jax.distributed` for a multi-process run; returns the spec used (None: 1 process)."""
    spec = detect_cluster(
        os.environ,
        on_tpu_vm=running_on_tpu_vm(),
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    if spec is None:
        _log.info("jaxalign: single process, jax.distributed not initialised")
        return None
    if jax.distributed.is_initialized():
        _log.info("jaxalign: jax.distributed already initialised")
        return spec
    _log.info("jaxalign: jax.distributed.initialize(%s) from %s", spec.kwargs(), spec.source)
    jax.distributed.initialize(**spec.kwargs())
    return spec
