"""`jaxalign.host_malloc`: the malloc tunables of CPU runs, the re-exec that sets them, and their
effect (freed large blocks are reused instead of being faulted in again)."""

import os
import subprocess
import sys

import pytest

from jaxalign import host_malloc

PROBE = """
import os, resource, sys
from jaxalign.host_malloc import reexec_with_tunables
reexec_with_tunables()
import numpy as np
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.empty(256 << 20, np.uint8)
    block.fill(1)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), max(faults[1:]))
"""


def _probe(**env):
    """(pid before and after the re-exec, GLIBC_TUNABLES, the most page faults of the last three
    256 MiB allocate-touch-free rounds) of a fresh interpreter."""
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXALIGN_MALLOC")}
    code = "import os; print(os.getpid())\n" + PROBE
    lines = subprocess.run(
        [sys.executable, "-c", code],
        env=base | {"JAX_PLATFORMS": "cpu"} | env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    pid, tunables, faults = lines[-1].split(" ")
    return int(lines[0]), int(pid), tunables, int(faults)


def test_tunables_are_added_and_the_users_kept():
    keys = list(host_malloc.TUNABLES)
    full = host_malloc.with_tunables("")
    assert [p.split("=")[0] for p in full.split(":")] == keys
    mine = host_malloc.with_tunables("glibc.malloc.arena_max=4:glibc.foo=1")
    assert mine.startswith("glibc.malloc.arena_max=4:glibc.foo=1:")
    assert "glibc.malloc.arena_max=1" not in mine
    assert host_malloc.with_tunables(full) is None


def test_runs_on_cpu_by_jax_platforms(monkeypatch):
    assert host_malloc.runs_on_cpu({"JAX_PLATFORMS": "cpu"})
    assert not host_malloc.runs_on_cpu({"JAX_PLATFORMS": "tpu,cpu"})
    assert not host_malloc.runs_on_cpu({"JAX_PLATFORMS": "cuda"})
    monkeypatch.setattr(host_malloc, "ACCELERATOR_PLUGINS", ("json",))  # an installed module
    assert not host_malloc.runs_on_cpu({})
    monkeypatch.setattr(host_malloc, "ACCELERATOR_PLUGINS", ("no_such_plugin_here",))
    assert host_malloc.runs_on_cpu({})


@pytest.mark.skipif(
    sys.platform != "linux" or host_malloc.platform.libc_ver()[0] != "glibc",
    reason="glibc tunables exist on Linux with glibc only",
)
def test_the_reexec_sets_them_and_large_blocks_are_reused():
    """The same process (PID) starts again with the tunables; then a freed 256 MiB block is
    reused without page faults, where glibc's default maps it afresh each time (65,536 faults
    of 4 KiB pages, or 128 of huge pages)."""
    pid_before, pid_after, tunables, faults = _probe()
    assert pid_before == pid_after
    assert tunables == host_malloc.with_tunables("")
    assert faults < 16
    _, _, tunables, faults = _probe(JAXALIGN_MALLOC="system")
    assert tunables == "" and faults >= 128


def test_the_module_prints_them_for_a_command_line():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-m", "jaxalign.host_malloc"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == host_malloc.with_tunables("")
