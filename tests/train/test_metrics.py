"""The metrics writer's Weights & Biases output, offline: the logged history and config are in the
offline run directory, only process 0 logs, a resumed run continues the same W&B run, and a
config that asks for W&B without the package is a one-line ConfigError."""

import glob
import json
import sys

import jax
import pytest

from jaxalign.config import apply_overrides, base_config
from jaxalign.errors import ConfigError
from jaxalign.train import workdir as workdirs
from jaxalign.train.metrics import MetricsWriter


def _workdir(tmp_path, *overrides):
    workdir = tmp_path / "run"
    workdir.mkdir()
    workdirs.write_config(workdir, apply_overrides(base_config(), list(overrides)))
    return workdir


def _strip(rows):
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]


def test_wandb_offline_holds_history_and_config(tmp_path, monkeypatch, wandb_offline):
    monkeypatch.setenv("WANDB_MODE", "offline")  # mode "" follows WANDB_MODE
    workdir = _workdir(tmp_path, "metrics.wandb.project=jaxalign-test", "metrics.wandb.name=dpo")
    writer = MetricsWriter(workdir, total_steps=4)
    writer.write(0, {"loss": 0.75}, split="eval")
    writer.write(2, {"loss": 0.5, "rewards/margin": 0.125})
    writer.close()
    (run_dir,) = glob.glob(f"{workdir}/wandb/offline-run-*")
    assert _strip(wandb_offline.history(run_dir)) == [
        {"step": 0, "eval/loss": 0.75},
        {"step": 2, "train/loss": 0.5, "train/rewards/margin": 0.125},
    ]
    (run,) = [r.run for r in wandb_offline.records(run_dir) if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert (run.project, run.display_name) == ("jaxalign-test", "dpo")
    assert config["metrics"]["wandb"]["project"] == "jaxalign-test"  # the whole config
    assert config["optimizer"]["lr"] == base_config().optimizer.lr
    run_id = (workdir / "wandb_run_id").read_text().strip()
    assert run.run_id == run_id
    # a resumed run continues the same W&B run
    writer = MetricsWriter(workdir, total_steps=4, start_step=2)
    writer.write(4, {"loss": 0.25})
    writer.close()
    runs = sorted(glob.glob(f"{workdir}/wandb/offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs)
    resumed = runs[1] if runs[0] == run_dir else runs[0]
    assert _strip(wandb_offline.history(resumed)) == [{"step": 4, "train/loss": 0.25}]


def test_wandb_mode_from_the_config_and_only_process_0(tmp_path, monkeypatch, wandb_offline):
    workdir = _workdir(tmp_path, "metrics.wandb.project=p", "metrics.wandb.mode=offline")
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    writer = MetricsWriter(workdir, total_steps=2)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert writer.wandb is None and not (workdir / "wandb").exists()
    assert not (workdir / "metrics.jsonl").exists()
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    writer = MetricsWriter(workdir, total_steps=2)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert len(glob.glob(f"{workdir}/wandb/offline-run-*")) == 1


def test_wandb_off_by_default(tmp_path, wandb_offline):
    workdir = _workdir(tmp_path)
    writer = MetricsWriter(workdir, total_steps=1)
    writer.close()
    assert writer.wandb is None and not (workdir / "wandb").exists()


def test_wandb_asked_for_but_not_installed_or_mistyped(tmp_path, monkeypatch, wandb_offline):
    workdir = _workdir(tmp_path, "metrics.wandb.project=p")
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails
    with pytest.raises(ConfigError) as e:
        MetricsWriter(workdir, total_steps=1)
    assert str(e.value) == (
        "metrics.wandb.project is set but wandb is not installed: pip install "
        "'jaxalign[wandb]' (or set --config.metrics.wandb.project=)"
    )
    assert not (workdir / "metrics.jsonl").exists()  # nothing opened
    config = workdirs.read_config(workdir)
    config["metrics"]["wandb"]["mode"] = "offline-please"
    (workdir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match='metrics.wandb.mode="offline-please": expected one of'):
        MetricsWriter(workdir, total_steps=1)
