"""Host memory of CPU runs: freed blocks stay in the process for the next step.

XLA's CPU backend allocates an executable's temporaries with ``malloc`` on every run and frees
them when it ends: gigabytes for a training step with a large vocabulary. glibc serves blocks
over 32 MiB with fresh ``mmap``s and gives them back with ``munmap``, so each step faults its
temporaries in again, page by page, while the kernel zeroes every page (the GRPO benchmark's
update: ~750,000 page faults and 3.7 s of system time in a 5.3 s step).

`TUNABLES` keep them: one malloc arena (the heap every thread allocates from), large blocks
from that heap instead of ``mmap``, no trimming of its top (freed blocks are reused by the next
step rather than returned to the kernel), and transparent huge pages for whatever is still
mapped (glibc 2.35+; older ones ignore it). The cost: the process keeps its peak heap until it
exits, and threads share one arena.

glibc reads ``GLIBC_TUNABLES`` only when a process starts, so `reexec_with_tunables` starts the
same command line again with them set (same PID, before anything heavy is imported). It does so
once, on Linux with glibc, for runs on the CPU (``JAX_PLATFORMS`` naming cpu first, or unset on
a machine without a TPU or GPU plugin for JAX); a tunable the user already set is left as set,
and ``JAXALIGN_MALLOC=system`` leaves the allocator as glibc sets it.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from collections.abc import Mapping

TUNABLES = {
    "glibc.malloc.arena_max": "1",
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.trim_threshold": str(1 << 40),
    "glibc.malloc.hugetlb": "1",
}
ACCELERATOR_PLUGINS = ("libtpu", "jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin")


def with_tunables(current: str) -> str | None:
    """``GLIBC_TUNABLES`` with `TUNABLES` added to ``current`` (``key=value`` pairs joined by
    ``:``), keys already there kept as they are; None when nothing is missing."""
    pairs = [p for p in current.split(":") if p]
    present = {p.split("=", 1)[0] for p in pairs}
    missing = [f"{k}={v}" for k, v in TUNABLES.items() if k not in present]
    return ":".join(pairs + missing) if missing else None


def runs_on_cpu(environ: Mapping[str, str]) -> bool:
    """Whether JAX will run on the CPU: ``JAX_PLATFORMS`` naming cpu first, or unset with none of
    `ACCELERATOR_PLUGINS` installed (looked up, not imported)."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) for name in ACCELERATOR_PLUGINS)


def tunables_for(environ: Mapping[str, str]) -> str | None:
    """The ``GLIBC_TUNABLES`` a process with ``environ`` should start with (`with_tunables`), or
    None: already set, ``JAXALIGN_MALLOC=system``, not Linux with glibc, or not a CPU run."""
    if environ.get("JAXALIGN_MALLOC") == "system":
        return None
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    if not runs_on_cpu(environ):
        return None
    return with_tunables(environ.get("GLIBC_TUNABLES", ""))


def reexec_with_tunables() -> None:
    """Start this process's command line again (``sys.orig_argv``) with `tunables_for` its
    environment; return when there is nothing to set. Call it first thing, before threads or
    files are opened: the process is replaced."""
    value = tunables_for(os.environ)
    if value is None:
        return
    os.environ["GLIBC_TUNABLES"] = value
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, sys.orig_argv)
    except OSError:  # no interpreter to start again: run as is
        return


if __name__ == "__main__":  # `GLIBC_TUNABLES=$(python -m jaxalign.host_malloc) CMD`: CMD with them
    current = os.environ.get("GLIBC_TUNABLES", "")
    print(with_tunables(current) or current)
