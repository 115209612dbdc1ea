"""Where metrics go: the console (progress bar with ETA), `metrics.jsonl`, TensorBoard and, when
the run's config sets `metrics.wandb.project`, Weights & Biases.

Only process 0 writes; the other hosts of a multi-host run keep quiet.

Weights & Biases (the ``[wandb]`` extra) reads its settings from the run's recorded config
(WORKDIR/config.json, written when the run starts) and logs that whole config. Keys are
``train/<metric>`` and ``eval/<metric>`` against a ``step`` axis (as in TensorBoard). The W&B run
id is kept in WORKDIR/wandb_run_id, so a resumed run continues the same W&B run (the steps it
repeats after its last checkpoint are logged again with the same values). ``metrics.wandb.mode``
(or ``WANDB_MODE``) ``offline`` writes the run under WORKDIR/wandb/ for ``wandb sync`` later.
"""

from __future__ import annotations

import json
import math
import pathlib
import secrets
import sys

import jax
import numpy as np
from tqdm import tqdm

from jaxalign.errors import ConfigError
from jaxalign.train.workdir import read_config, write_atomic

WANDB_MODES = ("online", "offline", "disabled")
WANDB_ID_FILE = "wandb_run_id"


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
        self.wandb = None
        if not self.active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.wandb = start_wandb(self.workdir)
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
        if self.wandb is not None:
            self.wandb.log({"step": step} | {f"{split}/{k}": v for k, v in values.items()})
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
        if self.wandb is not None:
            self.wandb.finish()


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


def start_wandb(workdir: pathlib.Path):
    """The W&B run that `metrics.wandb` in WORKDIR/config.json asks for, or None ("" project, or
    no recorded config). A missing package or a bad mode is a `ConfigError`."""
    config = read_config(workdir) or {}
    settings = config.get("metrics", {}).get("wandb", {})
    if not settings.get("project"):
        return None
    mode = settings.get("mode", "")
    if mode and mode not in WANDB_MODES:
        raise ConfigError(
            f'metrics.wandb.mode="{mode}": expected one of {", ".join(WANDB_MODES)} or ""'
        )
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "metrics.wandb.project is set but wandb is not installed: pip install "
            "'jaxalign[wandb]' (or set --config.metrics.wandb.project=)"
        ) from None
    id_file = workdir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    try:
        run = wandb.init(
            project=settings["project"],
            entity=settings.get("entity") or None,
            name=settings.get("name") or workdir.resolve().name,
            mode=mode or None,
            dir=str(workdir),
            config=config,
            id=run_id,
            resume="allow",
        )
    except wandb.errors.Error as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"metrics.wandb: {first_line}") from None
    if not id_file.is_file():
        write_atomic(id_file, run_id + "\n")
    run.define_metric("step")
    run.define_metric("train/*", step_metric="step")
    run.define_metric("eval/*", step_metric="step")
    return run
