"""`jaxalign plot`: training curves from runs' ``metrics.jsonl``, several runs overlaid.

    jaxalign plot runs/demo/sft runs/demo/dpo --out runs/demo/curves.png

Each RUN is a run directory (its ``metrics.jsonl``) or a ``metrics.jsonl`` file. One panel per
metric, drawn when some run logged it, in this order: ``loss``; the online families' mean
``reward`` and their eval rewards ``reward/sampled`` and ``reward/greedy``; the preference
families' ``rewards/margin`` and ``rewards/accuracy``; every metric whose name contains ``kl``
(e.g. ``kl``, ``rewards/kl``, ``policy/kl_coef``); then ``learning_rate``. Train records are
solid lines and eval records (split ``eval``: before training, every ``eval_every`` steps, at the
end) dashed lines with markers, in the run's colour; runs are labelled by their directory name
(by their path when two names are the same). Drawn on a bare matplotlib `Figure` (rendered by
Agg: no display needed, pyplot's state untouched), written to a temporary file and renamed. A
missing, empty or corrupt metrics file is a `DataError`.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
from collections.abc import Sequence

import matplotlib
from matplotlib.figure import Figure

from jaxalign.errors import ConfigError, DataError

FIRST = ("loss", "reward", "reward/sampled", "reward/greedy", "rewards/margin", "rewards/accuracy")
LAST = ("learning_rate",)
METRICS_FILE = "metrics.jsonl"


def read_metrics(run: str) -> list[dict]:
    """The records of a run's metrics.jsonl (a torn last line, from a killed run, is dropped)."""
    path = pathlib.Path(run)
    if not path.exists():
        raise DataError(f"{run}: not found")
    if path.is_dir():
        path = path / METRICS_FILE
        if not path.is_file():
            raise DataError(f"{run}: no {METRICS_FILE} (not a jaxalign run directory?)")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise DataError(f"{path} line {number}: bad JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise DataError(f"{path} line {number}: expected a record with an integer step")
        records.append(record)
    if not records:
        raise DataError(f"{path}: no metrics yet (empty)")
    return records


def panels(runs: dict[str, list[dict]]) -> list[str]:
    """The metric of each panel, in order (module doc), among those the runs logged."""
    names = {k for records in runs.values() for r in records for k in r}
    kl = sorted(n for n in names if "kl" in n and n not in FIRST + LAST)
    return [n for n in (*FIRST, *kl, *LAST) if n in names]


def _labels(runs: Sequence[str]) -> list[str]:
    """Each run's directory name, or its path where two names are the same."""
    dirs = [pathlib.Path(r) if pathlib.Path(r).is_dir() else pathlib.Path(r).parent for r in runs]
    names = [d.resolve().name for d in dirs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, runs, strict=True)]


def draw(runs: dict[str, list[dict]], *, columns: int = 3):
    """A figure with one panel per metric of `panels`, every run overlaid: train solid, eval
    dashed with markers. `runs`: label -> metrics records."""
    names = panels(runs)
    if not names:
        raise DataError(
            f"{', '.join(runs)}: none of {', '.join(FIRST + LAST)} or a KL metric was logged"
        )
    rows = math.ceil(len(names) / columns)
    cols = min(columns, len(names))
    fig = Figure(figsize=(4.6 * cols, 3.1 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes.flat, names, strict=False):
        for i, (label, records) in enumerate(runs.items()):
            color = colors[i % len(colors)]
            for split, style in (("train", {"lw": 1.5}), ("eval", {"ls": "--", "marker": "o"})):
                points = [
                    (r["step"], r[name]) for r in records if r.get("split") == split and name in r
                ]
                if points:
                    steps, values = zip(*points, strict=True)
                    suffix = "" if split == "train" else " (eval)"
                    ax.plot(steps, values, color=color, label=label + suffix, ms=3, **style)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def plot_runs(runs: Sequence[str], out: str) -> list[str]:
    """Draw the curves of `runs` (run directories or metrics.jsonl files) to `out` (a PNG, or
    any format matplotlib writes, by the suffix); returns the panels' metric names."""
    labelled = {label: read_metrics(r) for label, r in zip(_labels(runs), runs, strict=True)}
    fig = draw(labelled)
    names = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    save_figure(fig, os.fspath(out))
    return names


def save_figure(fig, out: str) -> None:
    """`fig` to `out` (format from its suffix, PNG without one) through a temporary file in the
    same directory, renamed when complete."""
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fmt = os.path.splitext(out)[1].lstrip(".") or "png"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=f".{fmt}", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format=fmt, dpi=100)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # as a plain open() would create it
        os.replace(tmp, out)
    except ValueError as e:  # a format matplotlib does not write
        os.unlink(tmp)
        raise ConfigError(f"{out}: {e}") from None
    except BaseException:
        os.unlink(tmp)
        raise
