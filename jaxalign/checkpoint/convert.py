"""`jaxalign convert`: Hugging Face directory <-> jaxalign checkpoint.

A converted checkpoint is a run-style directory, `CKPT/checkpoints/0/`, holding `state` =
{"params": ...} and `config` = {"model_config": ...}; a training run starts from it with
`model.init_from="checkpoint:CKPT"`, and `to-hf` accepts it or any training run directory (and
then ships, by default, the tokenizer that run recorded).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import orbax.checkpoint as ocp

from jaxalign import models
from jaxalign.checkpoint import manager as ckpt
from jaxalign.checkpoint.hf import load_hf, save_hf
from jaxalign.errors import CheckpointError


def model_config_from_dict(d: dict) -> models.ModelConfig:
    d = dict(d)
    if d.get("rope_scaling"):
        d["rope_scaling"] = models.RopeScaling(**d["rope_scaling"])
    return models.ModelConfig(**d)


def from_hf(hf_dir, out, *, dtype=None) -> None:
    config, params = load_hf(hf_dir, dtype=dtype)
    manager = ckpt.make_manager(out, keep=1, async_save=False)
    if manager.latest_step() is not None:
        manager.close()
        raise CheckpointError(f"{ckpt.checkpoint_dir(out)}: already holds a checkpoint")
    manager.save(
        0,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params}),
            config=ocp.args.JsonSave({"model_config": dataclasses.asdict(config)}),
        ),
    )
    manager.wait_until_finished()
    manager.close()


def read_record(workdir) -> dict:
    """The config record of the latest checkpoint: a training run's config dict (tokenizer,
    data.template, ...) plus "model_config", or {"model_config": ...} for a converted
    checkpoint."""
    manager, step = ckpt.open_latest(workdir)
    try:
        record = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    finally:
        manager.close()
    if "model_config" not in record["config"]:
        raise CheckpointError(
            f"{ckpt.checkpoint_dir(workdir) / str(step)}: config records no model_config"
        )
    return record["config"]


def read_model_config(workdir) -> models.ModelConfig:
    """The model config recorded in the latest checkpoint of a run or converted checkpoint."""
    return model_config_from_dict(read_record(workdir)["model_config"])


def run_tokenizer(checkpoint) -> str | None:
    """The tokenizer a training run recorded (its config's `tokenizer`, a path as given to the
    run, so relative to the directory it ran from); None for a converted checkpoint."""
    return read_record(checkpoint).get("tokenizer") or None


def to_hf(checkpoint, out, *, tokenizer=None, dtype=None, overwrite: bool = False) -> str | None:
    """Exports the latest checkpoint of a run (or converted checkpoint) with `save_hf`.

    `tokenizer=None` ships the tokenizer the run recorded (`run_tokenizer`) when that file
    exists, so the export carries the special ids and the BOS handling the run trained with.
    Returns the tokenizer shipped, or None.
    """
    record = read_record(checkpoint)
    if tokenizer is None and record.get("tokenizer") and os.path.exists(record["tokenizer"]):
        tokenizer = record["tokenizer"]
    config = model_config_from_dict(record["model_config"])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        models.abstract_params(config),
    )
    params = ckpt.load_params(checkpoint, abstract)
    save_hf(config, params, out, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite)
    return None if tokenizer is None else str(tokenizer)
