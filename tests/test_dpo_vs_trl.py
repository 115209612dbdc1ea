"""benchmarks/dpo_vs_trl.py: its FLOP count from the architecture, and its output at a tiny size
(jaxalign's side alone in the fast test; both sides, TRL included, in the slow one). No timing is
asserted."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_TRL = importlib.util.find_spec("trl") is not None
sys.path.insert(0, str(ROOT / "benchmarks"))  # its sibling module hf_llama, as when run as a script
spec = importlib.util.spec_from_file_location("dpo_vs_trl", ROOT / "benchmarks/dpo_vs_trl.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["dpo_vs_trl"] = bench  # dataclasses look their module up there
spec.loader.exec_module(bench)


def test_flops_per_token_of_the_benchmark_model():
    """Llama d=256 L=4 heads 8/4 (head 32) ffn 1024 V=32000, T=255: per layer q, o 256x256, k, v
    256x128, gate/up/down 256x1024; the unembedding 256x32000; the embedding gather not counted."""
    per_layer = 2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 1024
    p = 4 * per_layer + 256 * 32000
    assert bench.matmul_params(bench.FULL) == p == 12_124_160
    assert bench.flops_per_token(bench.FULL) == 8 * p + 16 * 4 * 255 * 256


def _run(*flags):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/dpo_vs_trl.py"),
            "--quick",
            "--repeats",
            "1",
            *flags,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _row(out, side):
    """side, tokens, step s, tokens/s, GFLOP/s, of peak, first step s."""
    line = next(line for line in out.splitlines() if line.startswith(side + " "))
    fields = line.split()
    assert len(fields) == 7, line
    return fields


@pytest.mark.hf
def test_quick_benchmark_prints_every_field():
    out = _run("--skip-trl", "--steps", "1")
    assert "FLOPs/token = 8 P + 16 L T D = " in out
    assert re.search(r"GEMM peak: [0-9.]+ GFLOP/s \(f32 256\^3 matmul", out), out
    fields = _row(out, "jaxalign")
    assert fields[1] == "96"  # 2 pairs x 2 sequences x (8 + 16) tokens
    assert float(fields[3]) > 0 and fields[5].endswith("%")
    assert "TRL half skipped: --skip-trl" in out


@pytest.mark.hf
@pytest.mark.slow  # a benchmark; the fast sibling above runs jaxalign's side
def test_quick_benchmark_runs_both_sides():
    out = _run()
    _row(out, "jaxalign")
    if HAS_TRL:
        assert _row(out, "TRL")[1] == "96"  # the script also checks the positions each side ran
        assert "ratio jaxalign / TRL tokens/s: " in out
    else:
        assert "TRL half skipped: trl is not installed" in out
