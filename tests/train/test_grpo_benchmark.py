"""benchmarks/grpo.py --quick runs both sides (the TRL half is skipped, with a message, when TRL
is not installed). No timing is asserted."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
HAS_TRL = importlib.util.find_spec("trl") is not None


@pytest.mark.hf
@pytest.mark.slow  # a benchmark; jaxalign's half runs in tests/train/test_online*.py
def test_quick_grpo_benchmark_runs_both_sides():
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/grpo.py"), "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    ours = next(line for line in lines if line.startswith("jaxalign "))
    # steps/s, tokens/s, step, rollout, update and first-step seconds, mean length (16 new).
    assert len(ours.split()) == 8 and 14 <= float(ours.split()[-1]) <= 16, proc.stdout
    if HAS_TRL:
        assert any(line.startswith("TRL ") for line in lines), proc.stdout
        assert "ratio jaxalign / TRL: steps/s" in proc.stdout
    else:
        assert "TRL half skipped: trl is not installed" in proc.stdout
