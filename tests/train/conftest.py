"""Shared fixtures for the training tests: reading an offline Weights & Biases run."""

import glob
import json
import struct
import time
import types

import pytest


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B's own settings and caches under the test's directory (nothing from the network or the
    home directory); gives ``records(run_dir)`` and ``history(run_dir)`` of an offline run."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return types.SimpleNamespace(records=offline_records, history=history)


def _records_of(path) -> list:
    """The records of an offline W&B run file (its LevelDB-style log: a 7-byte file header, then
    in 32 KiB blocks records of checksum u32, length u16, type u8 and data; types 1 full, 2
    first, 3 middle, 4 last piece), parsed as W&B's protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        space = 32768 - pos % 32768
        if space < 7:
            pos += space
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def offline_records(run_dir) -> list:
    """The run's records once W&B's service has written them all (its `exit` record): `finish()`
    can return before the service process has flushed the offline file."""
    (path,) = glob.glob(f"{run_dir}/run-*.wandb")
    for _ in range(600):
        records = _records_of(path)
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        time.sleep(0.1)
    raise AssertionError(f"{path}: no exit record after 60 s")


def history(run_dir) -> list[dict]:
    return [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in offline_records(run_dir)
        if r.WhichOneof("record_type") == "history"
    ]
