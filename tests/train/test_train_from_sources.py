"""A DPO smoke run reads a Parquet file and a `datasets` directory exactly as it reads the
equivalent JSONL: the same first batches, array by array, and the same training metrics; with
W&B on (offline) the run's history lands in its offline run directory."""

import glob
import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxalign.config import apply_overrides, load_config
from jaxalign.train import setup, train

ROOT = pathlib.Path(__file__).resolve().parents[2]
DPO = str(ROOT / "configs/dpo/tiny.py")
PAIRS = ROOT / "data/demo/pairs_train.jsonl"


def _train_records(workdir) -> list[dict]:
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in r.items() if k not in ("tokens_per_s", "step_time_s")}
        for r in map(json.loads, lines)
        if r["split"] == "train"
    ]


@pytest.mark.hf  # `datasets` writes the directory
def test_dpo_from_parquet_and_datasets_equals_jsonl(tmp_path, wandb_offline):
    import datasets

    records = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "pairs.parquet")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "pairs_ds"), num_shards=2)
    paths = {
        "jsonl": str(PAIRS),
        "parquet": str(tmp_path / "pairs.parquet"),
        "datasets": str(tmp_path / "pairs_ds"),
    }
    configs = {
        name: apply_overrides(load_config(f"{DPO}:smoke=True"), [f"data.train={p}", "data.eval="])
        for name, p in paths.items()
    }
    first = {}
    for name, config in configs.items():
        batches = setup(config).batches(config.data.train, train=True)
        first[name] = [next(batches) for _ in range(3)]
    for name in ("parquet", "datasets"):
        for got, want in zip(first[name], first["jsonl"], strict=True):
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name} {key}")
    # W&B on for one run (offline; it changes nothing in training)
    configs["parquet"] = apply_overrides(
        configs["parquet"], ["metrics.wandb.project=jaxalign-test", "metrics.wandb.mode=offline"]
    )
    logged = {}
    for name, config in configs.items():
        train(config, tmp_path / name)
        logged[name] = _train_records(tmp_path / name)
    assert [r["step"] for r in logged["jsonl"]] == [2, 4]
    assert logged["parquet"] == logged["jsonl"] and logged["datasets"] == logged["jsonl"]
    (run_dir,) = glob.glob(f"{tmp_path}/parquet/wandb/offline-run-*")
    history = wandb_offline.history(run_dir)
    wandb_losses = [(h["step"], h["train/loss"]) for h in history if "train/loss" in h]
    assert wandb_losses == [(r["step"], r["loss"]) for r in logged["parquet"]]
