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
    if d.get("lora"):
        d["lora"] = models.LoraConfig(**d["lora"])
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


def _on(abstract, shardings):
    """`abstract` with `shardings` (a tree, or None: the first device)."""
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def load_adapters(checkpoint, heads: dict | None = None):
    """(model config with `lora`, {"lora": adapters, **heads}) of a LoRA run's latest checkpoint
    on the first device; `heads`: {name: abstract head} the run also trained."""
    config = read_model_config(checkpoint)
    if config.lora is None:
        raise CheckpointError(f"{checkpoint}: not a LoRA run (its model config has no lora)")
    abstract = models.attach({}, models.abstract_adapters(config)) | (heads or {})
    return config, ckpt.load_params(checkpoint, _on(abstract, None))


def base_source(checkpoint) -> tuple[str, int]:
    """Where a LoRA run's frozen base weights come from: its `model.init_from` ("" = the random
    init of its `seed`), a path as given to the run (relative to the directory it ran from)."""
    record = read_record(checkpoint)
    return record.get("model", {}).get("init_from", ""), int(record.get("seed", 0))


def load_model_params(checkpoint, *, shardings=None, heads: dict | None = None):
    """(model config without `lora`, params) of the latest checkpoint of a run or converted
    checkpoint, placed in `shardings` (a tree like the params; None: the first device). A LoRA
    run's checkpoint holds adapters only: they are merged into the base weights it trained on
    (`base_source`: loaded again from there; `models.merge_adapters`). `heads`: {name: abstract
    head} the checkpoint holds besides the decoder (a reward model's), returned in the params."""
    config = read_model_config(checkpoint)
    if config.lora is None:
        abstract = models.abstract_params(config) | (heads or {})
        return config, ckpt.load_params(checkpoint, _on(abstract, shardings))
    _, trained = load_adapters(checkpoint, heads)
    source, seed = base_source(checkpoint)
    base_config = config.replace(lora=None)
    kind, _, where = source.partition(":")
    if not source:
        base = jax.jit(models.init_params, static_argnums=0)(base_config, jax.random.key(seed))
    elif kind == "checkpoint":
        _, base = load_model_params(where)
    elif kind == "hf":
        _, base = load_hf(where, dtype=config.param_dtype)
    else:
        raise CheckpointError(f"{checkpoint}: unknown base weights model.init_from={source!r}")
    merged = models.merge_adapters(config, base, trained.pop(models.ADAPTERS)) | trained
    if shardings is not None:
        merged = jax.device_put(merged, shardings)
    return base_config, merged


def to_hf(
    checkpoint,
    out,
    *,
    tokenizer=None,
    dtype=None,
    overwrite: bool = False,
    adapter: bool = False,
) -> str | None:
    """Exports the latest checkpoint of a run (or converted checkpoint) with `save_hf`; a LoRA
    run's adapters merged into its base (`load_model_params`), or with `adapter` alone as a PEFT
    adapter directory (`jaxalign.checkpoint.adapters.save_peft_adapter`).

    `tokenizer=None` ships the tokenizer the run recorded (`run_tokenizer`) when that file
    exists, so the export carries the special ids and the BOS handling the run trained with.
    Returns the tokenizer shipped, or None.
    """
    record = read_record(checkpoint)
    if tokenizer is None and record.get("tokenizer") and os.path.exists(record["tokenizer"]):
        tokenizer = record["tokenizer"]
    if adapter:
        from jaxalign.checkpoint.adapters import save_peft_adapter

        config, trained = load_adapters(checkpoint)
        source, _ = base_source(checkpoint)
        base = source.partition(":")[2] if source.startswith("hf:") else None
        save_peft_adapter(
            config, trained[models.ADAPTERS], out, base_model=base, dtype=dtype,
            overwrite=overwrite,
        )  # fmt: skip
        return None
    config, params = load_model_params(checkpoint)
    save_hf(config, params, out, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite)
    return None if tokenizer is None else str(tokenizer)
