"""benchmarks/merge.py's jaxalign half at a tiny size (no mergekit): both merges run as
subprocesses and report wall time, peak RSS and the tensors held."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.hf
ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_benchmark_runs_tiny(capsys):
    spec = importlib.util.spec_from_file_location("merge_bench", ROOT / "benchmarks/merge.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--vocab", "64", "--width", "64", "--layers", "1", "--models", "2"])
    assert set(results) == {("linear", "jaxalign"), ("ties", "jaxalign")}
    for r in results.values():
        assert r["wall"] > 0 and r["rss"] > 2**20 and r["held_mib"] > 0
    printed = capsys.readouterr().out
    assert "held = " in printed and "mergekit: not compared" in printed
