"""Where metrics go: the console (progress bar with ETA), `metrics.jsonl` and TensorBoard.

Only process 0 writes; the other hosts of a multi-host run keep quiet.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import jax
import numpy as np
from tqdm import tqdm


def _scalar(x) -> float:
    return float(np.asarray(x))


class MetricsWriter:
    def __init__(self, workdir: str | pathlib.Path, *, total_steps: int, start_step: int = 0):
        """Appends to WORKDIR/metrics.jsonl and TensorBoard; on a resumed run (`start_step` > 0)
        TensorBoard drops the events after `start_step` that the interrupted run had written
        (`jaxalign.train.workdir.trim_metrics` does the same for metrics.jsonl)."""
        self.active = jax.process_index() == 0
        self.workdir = pathlib.Path(workdir)
        self.bar = None
        self.jsonl = None
        self.tb = None
        if not self.active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.workdir / "metrics.jsonl", "a")
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(
            str(self.workdir / "tensorboard"), purge_step=start_step + 1 if start_step else None
        )
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=None,
        )

    def advance(self, steps: int = 1):
        if self.bar is not None:
            self.bar.update(steps)

    def write(self, step: int, metrics: dict, split: str = "train"):
        """Record scalar metrics at `step`; returns them as Python floats."""
        values = {k: _scalar(v) for k, v in metrics.items()}
        if not self.active:
            return values
        self.jsonl.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        self.jsonl.flush()
        for k, v in values.items():
            if math.isfinite(v):
                self.tb.add_scalar(f"{split}/{k}", v, step)
        self.tb.flush()
        text = " ".join(f"{label}={values[k]:.4g}" for k, label in _SHOWN.items() if k in values)
        if split == "train":
            self.bar.set_postfix_str(text, refresh=True)
        else:
            self.print(f"step {step} {split}: {text}")
        return values

    def print(self, text: str):
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self):
        if not self.active:
            return
        self.bar.close()
        self.jsonl.close()
        self.tb.close()


_SHOWN = {  # metric -> short label on the console
    "loss": "loss",
    "rewards/accuracy": "acc",
    "rewards/margin": "margin",
    "logps/accuracy": "logp_acc",
    "reward": "reward",
    "reward/greedy": "reward_greedy",
    "reward/sampled": "reward_sampled",
    "kl": "kl",
    "grad_norm": "gnorm",
    "learning_rate": "lr",
    "tokens_per_s": "tok/s",
}
