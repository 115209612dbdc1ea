"""`jaxalign convert`: Hugging Face directory <-> jaxalign checkpoint.

A converted checkpoint is a run-style directory, `CKPT/checkpoints/0/`, holding `state` =
{"params": ...} and `config` = {"model_config": ...}; a training run starts from it with
`model.init_from="checkpoint:CKPT"`, and `to-hf` accepts it or any training run directory.
"""

from __future__ import annotations

import dataclasses

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


def read_config_record(workdir) -> dict:
    """The config record (JSON) of the latest checkpoint of a run or converted checkpoint: the
    run's config (tokenizer, data.template, ...) and its "model_config"."""
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
    return model_config_from_dict(read_config_record(workdir)["model_config"])


def to_hf(checkpoint, out, *, tokenizer=None, dtype=None) -> None:
    config = read_model_config(checkpoint)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        models.abstract_params(config),
    )
    params = ckpt.load_params(checkpoint, abstract)
    save_hf(config, params, out, tokenizer=tokenizer, dtype=dtype)
