"""benchmarks/device_suite.sh --dry: every part of the GPU suite runs on CPU at tiny sizes, the
table and the JSON come out, and one part failing or hanging does not stop the others."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_suite.sh"
_spec = importlib.util.spec_from_file_location("device_suite", ROOT / "benchmarks/device_suite.py")
suite = sys.modules["device_suite"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(suite)

HEADER = ["part", "measurement", "value", "goal", "status"]


def _script(tmp_path, *flags):
    env = os.environ | {"PYTHON": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry", *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads((tmp_path / "device_suite.json").read_text())
    return done, report


def _table_lines(stdout: str) -> list[str]:
    """The table: the lines after the header line (printed last)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:5] == HEADER)
    return lines[start + 1 :]


def test_script_dry_prints_table_last_and_writes_json(tmp_path):
    done, report = _script(tmp_path, "--parts", "ceilings,attention")
    assert done.returncode == 0, done.stdout + done.stderr
    assert report["dry"] is True and set(report["parts"]) == {"ceilings", "attention"}
    for part in report["parts"].values():
        assert part["status"] == "ok" and part["rows"], part
    assert report["ceilings"]["matmul_tflops"] > 0 and report["ceilings"]["copy_gbs"] > 0
    rows = _table_lines(done.stdout)
    assert [r.split()[0] for r in rows] == ["ceilings", "ceilings", "attention"]
    assert rows[-1].endswith("ok")  # the attention check passed, and nothing follows the table


@pytest.mark.slow
def test_script_dry_all_parts(tmp_path):
    done, report = _script(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(report["parts"]) == list(suite.PARTS)
    assert all(p["status"] == "ok" for p in report["parts"].values())
    parts = {r.split()[0] for r in _table_lines(done.stdout)}
    assert parts == set(suite.PARTS)


@pytest.mark.parametrize(
    "part",
    [
        pytest.param("kernels", marks=pytest.mark.slow),  # the kernels' own tests run them
        "logprob",
        "dpo",
        pytest.param("sampling", marks=pytest.mark.slow),  # tests/sampling runs generate
    ],
)
def test_part_runs_dry(part, tmp_path):
    """Each part's code path in this process (the script runs each in a child process)."""
    rec = suite.Recorder(part, str(tmp_path / "r.json"))
    suite.PARTS[part](rec, suite.DRY, True, {"matmul_tflops": 1e-3, "copy_gbs": 10.0})
    assert rec.errors == [] and rec.rows
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["rows"] == rec.rows
    assert all(row[4] in ("ok", "") for row in rec.rows), rec.rows  # kernel checks within limits
    if part == "dpo":
        step = rec.data["step_xla"]  # "auto" is XLA on CPU
        assert np.isfinite(step["loss"]) and step["tokens"] == 2 * suite.DRY.pairs * 32
        assert step["model_flops"] == 8 * step["matmul_params"] * step["tokens"]
    if part == "sampling":
        assert rec.data["batch2"]["hbm_bound_tokens_per_s"] > 0  # decode rate: noise at this size


def _commands(tmp_path):
    """Tiny stand-in parts: one succeeds and saves rows, one fails, one hangs."""
    ok = (
        "import json, sys; json.dump({'rows': [['a', 'x', '1', '', 'ok']], 'data': {'v': 1}, "
        "'errors': []}, open(sys.argv[-1], 'w'))"
    )
    fail = "import sys; print('boom'); sys.exit(3)"
    hang = "import time; time.sleep(60)"
    return {
        name: [sys.executable, "-c", code] for name, code in (("a", ok), ("b", fail), ("c", hang))
    }


def test_failures_and_timeouts_do_not_stop_the_others(tmp_path):
    commands = _commands(tmp_path)
    commands["d"] = commands["a"]
    caps = {"a": 30, "b": 30, "c": 1, "d": 30}
    results = suite.run_parts(commands, caps, budget=60)
    assert [results[k]["status"] for k in "abcd"] == ["ok", "failed", "timeout", "ok"]
    assert results["b"]["error"] == "exit status 3"
    assert "killed at its 1 s cap" in results["c"]["error"]
    assert results["d"]["data"] == {"v": 1}
    text = suite.table(results)
    assert "part failed" in text and "part timeout" in text


def test_budget_skips_what_does_not_fit(tmp_path):
    commands = _commands(tmp_path)
    results = suite.run_parts(
        {"c": commands["c"], "a": commands["a"]}, {"c": 60, "a": 30}, budget=6
    )
    assert results["c"]["status"] == "timeout" and results["a"]["status"] == "skipped"
