"""LoRA adapters as a PEFT adapter directory, which `peft.PeftModel.from_pretrained(base, DIR)`
loads onto the `transformers` base model.

    DIR/adapter_config.json          peft_type LORA, r, lora_alpha, lora_dropout, target_modules
    DIR/adapter_model.safetensors    base_model.model.<HF module>.lora_A.weight  [r, in]
                                     base_model.model.<HF module>.lora_B.weight  [out, r]

<HF module> is the projection's Hugging Face name from the conversion table
(`model.layers.{i}.self_attn.q_proj`, ...). PEFT computes W x + (alpha / r) B A x with torch
Linear layouts, so jaxalign's A [*in, r] is stored flattened and transposed to [r, in] and
B [r, *out] to [out, r], the in/out dimensions flattened in the order the base weights use.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import secrets
import shutil
import stat

import numpy as np

from jaxalign.checkpoint.hf import _DTYPES, _resolve_dtype, family_for
from jaxalign.errors import CheckpointError
from jaxalign.models.config import ModelConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def peft_tensors(config: ModelConfig, adapters: dict, dtype="float32") -> dict[str, np.ndarray]:
    """PEFT's {name: tensor} for jaxalign `adapters` (layers stacked on the leading axis)."""
    entries = {e.ours: e for e in family_for(config.replace(lora=None)).table}
    np_dtype = _DTYPES[_resolve_dtype(dtype, "save_peft_adapter")]
    out = {}
    for block, modules in adapters["layers"].items():
        for name, ab in modules.items():
            entry = entries[f"layers/{block}/{name}/kernel"]
            a, b = np.asarray(ab["lora_a"]), np.asarray(ab["lora_b"])  # [L, *in, r], [L, r, *out]
            r = a.shape[-1]
            fan_in, fan_out = math.prod(a.shape[1:-1]), math.prod(b.shape[2:])
            for i in range(config.n_layers):
                module = PREFIX + entry.hf.format(i=i).removesuffix(".weight")
                out[f"{module}.lora_A.weight"] = np.ascontiguousarray(
                    a[i].reshape(fan_in, r).T.astype(np_dtype)
                )
                out[f"{module}.lora_B.weight"] = np.ascontiguousarray(
                    b[i].reshape(r, fan_out).T.astype(np_dtype)
                )
    return out


def peft_config(config: ModelConfig, base_model: str | None = None) -> dict:
    """adapter_config.json: a LoRA adapter on every layer's projections named in `target_modules`
    (PEFT matches a name against the end of each module's name)."""
    lora = config.lora
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(m.split(".")[1] for m in lora.modules()),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_peft_adapter(
    config: ModelConfig,
    adapters: dict,
    path: str | os.PathLike,
    *,
    base_model: str | None = None,
    dtype=None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes `adapters` of `config.lora` as a PEFT LoRA directory (`peft_config`,
    `peft_tensors`; `dtype` default float32, `base_model` recorded as base_model_name_or_path).
    Built under a temporary sibling name and renamed into place; an existing `path` is an error
    unless `overwrite`."""
    from safetensors.numpy import save_file

    if config.lora is None:
        raise CheckpointError("save_peft_adapter: the model config has no lora")
    path = pathlib.Path(path).absolute()
    if path.exists() and not overwrite:
        raise CheckpointError(
            f"{path}: already exists (replace it with --overwrite, or overwrite=True in Python)"
        )
    tensors = peft_tensors(config, adapters, dtype or "float32")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        text = json.dumps(peft_config(config, base_model), indent=2) + "\n"
        (tmp / CONFIG_NAME).write_text(text)
        file_mode = stat.S_IMODE(tmp.stat().st_mode) & 0o666  # safetensors writes 0o600
        for file in tmp.iterdir():
            file.chmod(file_mode)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
