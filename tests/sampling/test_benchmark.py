"""benchmarks/generate.py runs: the quick CPU comparison with transformers, and the GPU mode's
shapes traced on this machine (--gpu --dry_run). No timing is asserted."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(*flags):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/generate.py"), *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.hf
def test_quick_benchmark_compares_with_transformers():
    proc = _run("--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("greedy") for line in lines), proc.stdout
    assert any(line.startswith("sampled (T=1)") for line in lines), proc.stdout
    assert "GEMM rate" in proc.stdout and "jaxalign compile" in proc.stdout


def test_gpu_mode_traces_its_shapes_on_cpu():
    proc = _run("--gpu", "--dry_run", "--hbm_gbps", "3350")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("(dry run)") == 2, proc.stdout
