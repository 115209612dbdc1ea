"""Hugging Face <-> jaxalign checkpoint conversion (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3,
Gemma 2, Gemma 3 text).

One key-mapping table per model family (``TABLES``): each row ties one Hugging Face tensor name
(``model.layers.{i}.self_attn.q_proj.weight``) to one jaxalign param path (``layers/attn/q_proj/
kernel``) with the two shapes in config letters and whether the matrix is transposed. The same
row drives both directions, so import and export cannot drift apart:

    to jaxalign:  x = (w.T if transpose else w).reshape(ours_shape)
    to HF:        w = x.reshape(reversed hf_shape if transpose else hf_shape), then .T

e.g. ``q_proj.weight`` [N*H, D] (torch Linear is [out, in]) -> ``q_proj/kernel`` [D, N, H];
``o_proj.weight`` [D, N*H] -> ``o_proj/kernel`` [N, H, D]. RoPE uses the HF "rotate_half" layout
in both libraries, so q/k need no permutation. Per-layer tensors (``{i}`` in the name) are stacked
along a new leading axis L. Mistral shares the Llama table; Qwen2 adds the q/k/v biases, Qwen3 the
per-head q/k RMSNorm scales. Gemma 2 has four norms per layer (HF ``post_attention_layernorm`` is
the norm AFTER attention there, ``pre_feedforward_layernorm`` the one before the MLP); Gemma 3
adds the q/k norms. Gemma norm weights w are stored as HF stores them (the model scales by
``1 + w``), so they convert unchanged.

Conversion goes tensor by tensor: import reads one stacked parameter's L slices from the
(possibly sharded) safetensors files, converts it, places it (``shardings``) and frees the host
copy; export pulls one stacked parameter to the host at a time and flushes each output shard file
once it reaches ``max_shard_size``. Host memory stays near one copy of the model.

Export writes the directory under a temporary sibling name and renames it into place at the end,
so a failed export never leaves a partial model directory. With a tokenizer it also writes the
special token ids and, when the tokenizer source has none, a tokenizer config, so that
transformers alone tokenises a prompt to jaxalign's ids and ``generate`` stops at EOS
(``save_hf``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import jax
import ml_dtypes
import numpy as np

from jaxalign.errors import CheckpointError
from jaxalign.models.config import ModelConfig, RopeScaling, local_layers

SAFETENSORS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Non-parameter buffers some older checkpoints carry; transformers ignores them too.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


# --------------------------------------------------------------------------- key-mapping tables


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of a mapping table.

    ``hf``: tensor name (``{i}`` = layer index); ``ours``: '/'-joined param path; ``hf_shape``,
    ``ours_shape``: space-separated dims in config letters (V D F N K H; "NH" is N*H) of ONE layer;
    ``transpose``: the torch Linear [out, in] layout is transposed to [in, out] before reshaping;
    ``when``: rows only present for some configs (the untied ``lm_head``).
    """

    hf: str
    ours: str
    hf_shape: str
    ours_shape: str
    transpose: bool = False
    when: Callable[[ModelConfig], bool] | None = None

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def hf_names(self, config: ModelConfig) -> list[str]:
        if self.per_layer:
            return [self.hf.format(i=i) for i in range(config.n_layers)]
        return [self.hf]

    def to_ours(self, w: np.ndarray, config: ModelConfig) -> np.ndarray:
        return (w.T if self.transpose else w).reshape(_dims(self.ours_shape, config))

    def to_hf(self, x: np.ndarray, config: ModelConfig) -> np.ndarray:
        shape = _dims(self.hf_shape, config)
        if self.transpose:
            return np.ascontiguousarray(x.reshape(shape[::-1]).T)
        return np.ascontiguousarray(x.reshape(shape))

    def stacked_shape(self, config: ModelConfig) -> tuple[int, ...]:
        """Shape of the jaxalign param: ``ours_shape`` with a leading L for per-layer rows."""
        shape = _dims(self.ours_shape, config)
        return (config.n_layers, *shape) if self.per_layer else shape


def _dims(spec: str, config: ModelConfig) -> tuple[int, ...]:
    sizes = {
        "V": config.vocab_size,
        "D": config.d_model,
        "F": config.d_ff,
        "N": config.n_heads,
        "K": config.n_kv_heads,
        "H": config.head_dim,
    }
    return tuple(math.prod(sizes[c] for c in dim) for dim in spec.split())


def _untied(config: ModelConfig) -> bool:
    return not config.tie_embeddings


_ATTN = "model.layers.{i}.self_attn"
_MLP = "model.layers.{i}.mlp"
LLAMA_TABLE: tuple[Entry, ...] = (
    Entry("model.embed_tokens.weight", "embed/embedding", "V D", "V D"),
    Entry("model.layers.{i}.input_layernorm.weight", "layers/attn_norm/scale", "D", "D"),
    Entry(f"{_ATTN}.q_proj.weight", "layers/attn/q_proj/kernel", "NH D", "D N H", True),
    Entry(f"{_ATTN}.k_proj.weight", "layers/attn/k_proj/kernel", "KH D", "D K H", True),
    Entry(f"{_ATTN}.v_proj.weight", "layers/attn/v_proj/kernel", "KH D", "D K H", True),
    Entry(f"{_ATTN}.o_proj.weight", "layers/attn/o_proj/kernel", "D NH", "N H D", True),
    Entry("model.layers.{i}.post_attention_layernorm.weight", "layers/mlp_norm/scale", "D", "D"),
    Entry(f"{_MLP}.gate_proj.weight", "layers/mlp/gate_proj/kernel", "F D", "D F", True),
    Entry(f"{_MLP}.up_proj.weight", "layers/mlp/up_proj/kernel", "F D", "D F", True),
    Entry(f"{_MLP}.down_proj.weight", "layers/mlp/down_proj/kernel", "D F", "F D", True),
    Entry("model.norm.weight", "final_norm/scale", "D", "D"),
    Entry("lm_head.weight", "unembed/kernel", "V D", "D V", True, when=_untied),
)
QKV_BIAS_ROWS: tuple[Entry, ...] = (
    Entry(f"{_ATTN}.q_proj.bias", "layers/attn/q_proj/bias", "NH", "N H"),
    Entry(f"{_ATTN}.k_proj.bias", "layers/attn/k_proj/bias", "KH", "K H"),
    Entry(f"{_ATTN}.v_proj.bias", "layers/attn/v_proj/bias", "KH", "K H"),
)
QK_NORM_ROWS: tuple[Entry, ...] = (
    Entry(f"{_ATTN}.q_norm.weight", "layers/attn/q_norm/scale", "H", "H"),
    Entry(f"{_ATTN}.k_norm.weight", "layers/attn/k_norm/scale", "H", "H"),
)
_LAYER = "model.layers.{i}"
GEMMA_TABLE: tuple[Entry, ...] = (
    Entry("model.embed_tokens.weight", "embed/embedding", "V D", "V D"),
    Entry(f"{_LAYER}.input_layernorm.weight", "layers/attn_norm/scale", "D", "D"),
    *LLAMA_TABLE[2:6],  # q, k, v, o projections
    Entry(f"{_LAYER}.post_attention_layernorm.weight", "layers/attn_post_norm/scale", "D", "D"),
    Entry(f"{_LAYER}.pre_feedforward_layernorm.weight", "layers/mlp_norm/scale", "D", "D"),
    *LLAMA_TABLE[7:10],  # gate, up, down projections
    Entry(f"{_LAYER}.post_feedforward_layernorm.weight", "layers/mlp_post_norm/scale", "D", "D"),
    *LLAMA_TABLE[10:],  # final norm, untied lm_head
)
# transformers' config-class defaults, for keys a Gemma config.json leaves out (hub configs omit
# e.g. tie_word_embeddings, and Gemma 3's text_config most sizes). sliding_window_pattern 2 is
# Gemma 2's fixed alternation before transformers wrote layer_types.
_GEMMA_DEFAULTS = {
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
}
GEMMA2_DEFAULTS = _GEMMA_DEFAULTS | {
    "vocab_size": 256000,
    "max_position_embeddings": 8192,
    "rope_theta": 10000.0,
    "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0,
    "sliding_window_pattern": 2,
}
GEMMA3_DEFAULTS = _GEMMA_DEFAULTS | {
    "vocab_size": 262208,
    "max_position_embeddings": 131072,
    "rope_theta": 1e6,
    "rope_local_base_freq": 10000.0,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "sliding_window_pattern": 6,
}


@dataclasses.dataclass(frozen=True)
class Family:
    """A Hugging Face architecture: its names, its mapping table and the options it can express.

    ``gemma``: the Gemma block ((1 + w) norms, post-norms, sqrt(D) embedding scale, GeGLU,
    ``query_pre_attn_scalar``, final-logit soft-cap); ``attn_softcap``: honours
    ``attn_logit_softcapping`` (Gemma 2; transformers' Gemma 3 ignores it); ``local_rope``: RoPE
    per layer type (Gemma 3); ``defaults``: values of keys a config.json may leave out.
    """

    architecture: str
    model_type: str
    table: tuple[Entry, ...]
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: str = "none"  # "none" | "global" (Mistral) | "layer_types" (Qwen2/3, Gemma)
    gemma: bool = False
    attn_softcap: bool = False
    local_rope: bool = False
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)

    def entries(self, config: ModelConfig) -> list[Entry]:
        return [e for e in self.table if e.when is None or e.when(config)]


FAMILIES: dict[str, Family] = {
    f.architecture: f
    for f in (
        Family("LlamaForCausalLM", "llama", LLAMA_TABLE),
        Family("MistralForCausalLM", "mistral", LLAMA_TABLE, sliding_window="global"),
        Family(
            "Qwen2ForCausalLM",
            "qwen2",
            LLAMA_TABLE + QKV_BIAS_ROWS,
            qkv_bias=True,
            sliding_window="layer_types",
        ),
        Family(
            "Qwen3ForCausalLM",
            "qwen3",
            LLAMA_TABLE + QK_NORM_ROWS,
            qk_norm=True,
            sliding_window="layer_types",
        ),
        Family(
            "Gemma2ForCausalLM",
            "gemma2",
            GEMMA_TABLE,
            sliding_window="layer_types",
            gemma=True,
            attn_softcap=True,
            defaults=GEMMA2_DEFAULTS,
        ),
        Family(
            "Gemma3ForCausalLM",
            "gemma3_text",
            GEMMA_TABLE + QK_NORM_ROWS,
            qk_norm=True,
            sliding_window="layer_types",
            gemma=True,
            local_rope=True,
            defaults=GEMMA3_DEFAULTS,
        ),
    )
}
_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}


# --------------------------------------------------------------------------------- config.json


def _family_from_hf(hf: dict, where: str) -> Family:
    archs = hf.get("architectures") or []
    if archs:
        if archs[0] not in FAMILIES:
            raise CheckpointError(
                f"{where}: unknown architecture {archs[0]!r}; supported: {sorted(FAMILIES)}"
            )
        return FAMILIES[archs[0]]
    model_type = hf.get("model_type")
    if model_type not in _BY_MODEL_TYPE:
        raise CheckpointError(
            f"{where}: no 'architectures' and unknown model_type {model_type!r}; "
            f"supported: {sorted(_BY_MODEL_TYPE)}"
        )
    return _BY_MODEL_TYPE[model_type]


def _read_scaling(params: dict, where: str) -> RopeScaling | None:
    """``RopeScaling`` of one rope dict (``rope_scaling`` or an entry of ``rope_parameters``)."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type == "linear":
        return RopeScaling(factor=float(params["factor"]), rope_type="linear")
    if rope_type != "llama3":
        raise CheckpointError(
            f"{where}: rope_scaling type {rope_type!r} is not supported (only 'llama3', 'linear')"
        )
    return RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _read_rope(
    hf: dict, family: Family, where: str
) -> tuple[float, RopeScaling | None, float | None]:
    """RoPE ``(theta, scaling, local_theta)`` from transformers 4 keys (``rope_theta``,
    ``rope_scaling``, Gemma 3's ``rope_local_base_freq``) or transformers 5 ``rope_parameters``
    (Gemma 3: one entry per layer type)."""
    params = hf.get("rope_parameters") or {}
    if not family.local_rope:
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        return theta, _read_scaling(hf.get("rope_scaling") or params, where), None
    if "full_attention" in params:
        full, local = params["full_attention"], params.get("sliding_attention") or {}
    else:
        full, local = hf.get("rope_scaling") or {}, {}
    if _read_scaling(local, where) is not None:
        raise CheckpointError(f"{where}: RoPE scaling on sliding-window layers is not supported")
    theta = float(full.get("rope_theta", hf["rope_theta"]))
    local_theta = float(local.get("rope_theta", hf["rope_local_base_freq"]))
    return theta, _read_scaling(full, where), local_theta


def _read_sliding_window(hf: dict, family: Family, where: str) -> tuple[int | None, int | None]:
    """``(sliding_window, sliding_window_pattern)``: ``layer_types`` must make every layer local,
    none, or every P-th layer global."""
    window = hf.get("sliding_window")
    if family.sliding_window == "global":
        return window, None
    if family.sliding_window == "none" or window is None:
        return None, None
    n_layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if layer_types is None and family.gemma:  # transformers 4: every P-th layer is global
        pattern = hf["sliding_window_pattern"]
        layer_types = [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)
        ]
    elif layer_types is None:  # transformers 4 Qwen: layers >= max_window_layers slide
        first = hf.get("max_window_layers", n_layers) if hf.get("use_sliding_window") else n_layers
        layer_types = [
            "sliding_attention" if i >= first else "full_attention" for i in range(n_layers)
        ]
    if len(layer_types) != n_layers or not set(layer_types) <= {
        "sliding_attention",
        "full_attention",
    }:
        raise CheckpointError(
            f"{where}: layer_types={layer_types}; expected {n_layers} entries, each "
            "'sliding_attention' or 'full_attention'"
        )
    sliding = [kind == "sliding_attention" for kind in layer_types]
    if not any(sliding):
        return None, None
    if all(sliding):
        return window, None
    pattern = sliding.index(False) + 1
    if sliding != [(i + 1) % pattern != 0 for i in range(n_layers)]:
        raise CheckpointError(
            f"{where}: layer_types={layer_types} mix sliding and full attention in a way jaxalign "
            "models do not express (all sliding, or every P-th layer full: sliding_window_pattern)"
        )
    return window, pattern


def config_from_hf(hf: dict, *, dtype: str = "float32", where: str = "config.json") -> ModelConfig:
    """``ModelConfig`` from a Hugging Face ``config.json`` dict (raises on unsupported options)."""
    family = _family_from_hf(hf, where)
    hf = family.defaults | hf
    if family.gemma:
        if hf["hidden_activation"] != "gelu_pytorch_tanh":
            raise CheckpointError(
                f"{where}: hidden_activation={hf['hidden_activation']!r}; only "
                "'gelu_pytorch_tanh' is supported"
            )
        if hf.get("use_bidirectional_attention"):
            raise CheckpointError(f"{where}: use_bidirectional_attention=true is not supported")
    elif hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act={hf['hidden_act']!r}; only 'silu' is supported")
    if hf.get("mlp_bias"):
        raise CheckpointError(f"{where}: mlp_bias=true is not supported")
    if hf.get("attention_bias") and not family.qkv_bias:
        raise CheckpointError(
            f"{where}: attention_bias=true (biases on q/k/v/o) is not supported for "
            f"{family.architecture}"
        )
    theta, scaling, local_theta = _read_rope(hf, family, where)
    window, pattern = _read_sliding_window(hf, family, where)
    n_heads = hf["num_attention_heads"]

    def cap(key: str, present: bool) -> float | None:
        return None if not present or hf.get(key) is None else float(hf[key])

    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        d_ff=hf["intermediate_size"],
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias,
        qk_norm=family.qk_norm,
        sliding_window=window,
        sliding_window_pattern=pattern,
        rope_local_theta=local_theta,
        norm_plus_one=family.gemma,
        post_norms=family.gemma,
        embed_scale=family.gemma,
        activation="gelu_tanh" if family.gemma else "silu",
        query_pre_attn_scalar=int(hf["query_pre_attn_scalar"]) if family.gemma else None,
        attn_logit_softcap=cap("attn_logit_softcapping", family.attn_softcap),
        final_logit_softcap=cap("final_logit_softcapping", family.gemma),
        max_seq_len=hf.get("max_position_embeddings", 4096),
        dtype=dtype,
        param_dtype=dtype,
    )


def family_for(config: ModelConfig, architecture: str | None = None) -> Family:
    """The HF family that expresses ``config``: the named ``architecture``, or inferred (post_norms
    -> Gemma 3 with qk_norm, else Gemma 2; qk_norm -> Qwen3, qkv_bias -> Qwen2, sliding_window ->
    Mistral, else Llama)."""
    if architecture is None:
        if config.post_norms:
            architecture = "Gemma3ForCausalLM" if config.qk_norm else "Gemma2ForCausalLM"
        elif config.qk_norm:
            architecture = "Qwen3ForCausalLM"
        elif config.qkv_bias:
            architecture = "Qwen2ForCausalLM"
        elif config.sliding_window is not None:
            architecture = "MistralForCausalLM"
        else:
            architecture = "LlamaForCausalLM"
    if architecture not in FAMILIES:
        raise CheckpointError(
            f"unknown architecture {architecture!r}; supported: {sorted(FAMILIES)}"
        )
    family = FAMILIES[architecture]
    gemma = family.gemma
    expressible = {
        "qkv_bias": config.qkv_bias == family.qkv_bias,
        "qk_norm": config.qk_norm == family.qk_norm,
        "sliding_window": config.sliding_window is None or family.sliding_window != "none",
        "sliding_window_pattern": config.sliding_window_pattern is None
        or family.sliding_window == "layer_types",
        "rope_local_theta": (config.rope_local_theta is not None) == family.local_rope,
        "norm_plus_one": config.norm_plus_one == gemma,
        "post_norms": config.post_norms == gemma,
        "embed_scale": config.embed_scale == gemma,
        "activation": (config.activation == "gelu_tanh") == gemma,
        "query_pre_attn_scalar": config.query_pre_attn_scalar is None or gemma,
        "final_logit_softcap": config.final_logit_softcap is None or gemma,
        "attn_logit_softcap": config.attn_logit_softcap is None or family.attn_softcap,
    }
    problems = [f"{key}={getattr(config, key)!r}" for key, ok in expressible.items() if not ok]
    if problems:
        raise CheckpointError(f"{architecture} cannot express ModelConfig({', '.join(problems)})")
    return family


def _scaling_to_hf(scaling: RopeScaling) -> dict[str, Any]:
    if scaling.rope_type == "linear":
        return {"rope_type": "linear", "factor": scaling.factor}
    llama3 = {k: v for k, v in dataclasses.asdict(scaling).items() if k != "rope_type"}
    return {"rope_type": "llama3", **llama3}


def config_to_hf(config: ModelConfig, family: Family, torch_dtype: str) -> dict[str, Any]:
    """``config.json`` dict readable by transformers 4 (``rope_theta``/``rope_scaling``,
    ``rope_local_base_freq``, ``sliding_window_pattern``) and 5 (``rope_parameters``,
    ``layer_types``)."""
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    rope_scaling = None
    if config.rope_scaling is not None:
        rope_scaling = _scaling_to_hf(config.rope_scaling)
        rope_parameters.update(rope_scaling)
    hf: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        **({} if family.gemma else {"hidden_act": "silu"}),  # Gemma: hidden_activation
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }
    if family.model_type in ("llama", "qwen3") or family.gemma:
        hf["attention_bias"] = False
    if family.model_type == "llama":
        hf.update(mlp_bias=False, pretraining_tp=1)
    local = local_layers(config)
    kinds = ["sliding_attention" if x else "full_attention" for x in local]
    if family.sliding_window == "global":
        hf["sliding_window"] = config.sliding_window
    elif family.gemma:
        hf.update(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim,
            final_logit_softcapping=config.final_logit_softcap,
            attn_logit_softcapping=config.attn_logit_softcap,
            # transformers builds the sliding-window mask even when no layer uses it.
            sliding_window=config.sliding_window or config.max_seq_len,
            layer_types=kinds,
        )
    elif family.sliding_window == "layer_types":
        sliding = bool(local.any())
        hf.update(
            sliding_window=config.sliding_window,
            use_sliding_window=sliding,
            max_window_layers=0 if sliding else config.n_layers,
            layer_types=kinds,
        )
    if family.local_rope:
        local_rope = {"rope_type": "default", "rope_theta": config.rope_local_theta}
        hf.update(
            rope_local_base_freq=config.rope_local_theta,
            rope_parameters={"full_attention": rope_parameters, "sliding_attention": local_rope},
            # every layer local is a pattern longer than the model
            sliding_window_pattern=config.sliding_window_pattern or config.n_layers + 1,
            use_bidirectional_attention=False,
        )
    return hf


# ------------------------------------------------------------------------------------- reading


class _SafetensorsReader:
    """Tensors of a single-file or index-sharded safetensors checkpoint, opened lazily (mmap).

    A truncated or corrupt file raises `CheckpointError` naming it (safetensors validates the
    header and that the data section covers every tensor when the file is opened).
    """

    def __init__(self, path: pathlib.Path, stack: ExitStack):
        self._path, self._stack, self._handles = path, stack, {}
        index = path / INDEX_NAME
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            self.files = dict(weight_map)
            for file in sorted(set(self.files.values())):
                if not (path / file).exists():
                    raise CheckpointError(f"{index}: lists shard {file}, which does not exist")
        elif (path / SAFETENSORS_NAME).exists():
            self.files = dict.fromkeys(self._open(SAFETENSORS_NAME).keys(), SAFETENSORS_NAME)
        else:
            raise CheckpointError(f"{path}: neither {SAFETENSORS_NAME} nor {INDEX_NAME} found")

    def _open(self, file: str):
        from safetensors import SafetensorError, safe_open

        if file not in self._handles:
            try:
                handle = safe_open(str(self._path / file), framework="numpy")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(
                    f"{self._path / file}: not a readable safetensors file ({e}); truncated or "
                    "corrupt? Export or download it again"
                ) from None
            self._handles[file] = self._stack.enter_context(handle)
        return self._handles[file]

    def where(self, name: str) -> str:
        return str(self._path / self.files[name])

    def header(self, name: str) -> tuple[tuple[int, ...], str]:
        handle = self._open(self.files[name])
        if name not in handle.keys():
            raise CheckpointError(
                f"{name}: listed in {INDEX_NAME} but absent from {self.where(name)}"
            )
        sl = handle.get_slice(name)
        return tuple(sl.get_shape()), sl.get_dtype()

    def get(self, name: str) -> np.ndarray:
        return self._open(self.files[name]).get_tensor(name)


def _read_json(file: pathlib.Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(value).__name__}")
    return value


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _resolve_dtype(dtype: Any, what: str) -> str:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPES:
        raise CheckpointError(f"{what}: dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return name


def _check_tensors(reader: _SafetensorsReader, config: ModelConfig, entries: list[Entry]) -> None:
    """Every expected tensor present with its shape and a float dtype; nothing unexpected."""
    expected = {name: e for e in entries for name in e.hf_names(config)}
    present = {n for n in reader.files if not _IGNORED.fullmatch(n)}
    if config.tie_embeddings:
        present.discard("lm_head.weight")  # checked against the embedding in load_hf
    missing = sorted(set(expected) - present, key=_natural)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{missing[0]}: missing tensor in {reader._path}{more}")
    unexpected = sorted(present - set(expected), key=_natural)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{unexpected[0]}: unexpected tensor in {reader.where(unexpected[0])}{more}; "
            "config.json does not describe it"
        )
    for name, entry in expected.items():
        shape, st_dtype = reader.header(name)
        want = _dims(entry.hf_shape, config)
        if shape != want:
            raise CheckpointError(
                f"{name}: expected shape {want}, found {shape} (in {reader.where(name)})"
            )
        if st_dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{name}: expected dtype float32/bfloat16/float16, found {st_dtype} "
                f"(in {reader.where(name)})"
            )


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _set(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _get(tree: Any, path: str, what: str) -> Any:
    for key in path.split("/"):
        if not isinstance(tree, dict) or key not in tree:
            raise CheckpointError(f"{what}: missing entry {path!r}")
        tree = tree[key]
    return tree


def load_hf_config(path: str | os.PathLike, *, dtype: Any = "float32") -> ModelConfig:
    """The ``ModelConfig`` of a Hugging Face directory without reading weights (float32 by
    default: the training runs keep float32 master weights whatever the checkpoint stores)."""
    config_file = pathlib.Path(path) / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{config_file}: not found; expected a Hugging Face model directory")
    hf = _read_json(config_file)
    return config_from_hf(hf, dtype=_resolve_dtype(dtype, "dtype"), where=str(config_file))


def load_hf(
    path: str | os.PathLike, *, dtype: Any = None, shardings: dict | None = None
) -> tuple[ModelConfig, dict]:
    """Loads a Hugging Face causal-LM directory as ``(ModelConfig, params)``.

    ``dtype``: storage dtype of the returned params (and the config's ``dtype``/``param_dtype``);
    None keeps the checkpoint's ``torch_dtype`` (float32/bfloat16/float16). ``shardings``: a tree
    of ``jax.sharding.Sharding`` shaped like the params; each converted stacked tensor is placed
    straight into it (``jax.make_array_from_callback``, so each process copies only the shards its
    devices hold), otherwise params land on the default device. Raises ``CheckpointError`` naming
    the tensor for an unknown architecture, missing/unexpected tensors or a shape/dtype mismatch.
    """
    path = pathlib.Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{config_file}: not found; expected a Hugging Face model directory")
    hf = _read_json(config_file)
    with ExitStack() as stack:
        reader = _SafetensorsReader(path, stack)
        if dtype is None:
            stored = hf.get("torch_dtype") or hf.get("dtype")
            if stored is None:
                first = next(iter(reader.files))
                stored = _SAFETENSORS_DTYPES.get(reader.header(first)[1], "float32")
            dtype = stored
        dtype = _resolve_dtype(dtype, f"{config_file}: torch_dtype")
        config = config_from_hf(hf, dtype=dtype, where=str(config_file))
        entries = _family_from_hf(hf, str(config_file)).entries(config)
        _check_tensors(reader, config, entries)
        np_dtype = _DTYPES[dtype]
        params: dict = {}
        for entry in entries:
            out = np.empty(entry.stacked_shape(config), np_dtype)
            names = entry.hf_names(config)
            for i, name in enumerate(names):
                value = entry.to_ours(reader.get(name), config).astype(np_dtype, copy=False)
                if entry.per_layer:
                    out[i] = value
                else:
                    out[...] = value
            sharding = None if shardings is None else _get(shardings, entry.ours, "shardings")
            _set(params, entry.ours, _place(out, sharding))
            del out
        if config.tie_embeddings and "lm_head.weight" in reader.files:
            _check_tied(reader, params, np_dtype)
    return config, params


def _check_tied(reader: _SafetensorsReader, params: dict, np_dtype: np.dtype) -> None:
    head = reader.get("lm_head.weight").astype(np_dtype, copy=False)
    embedding = np.asarray(jax.device_get(params["embed"]["embedding"]))
    if head.shape != embedding.shape or not np.array_equal(head, embedding):
        raise CheckpointError(
            f"lm_head.weight: config.json sets tie_word_embeddings=true but this tensor differs "
            f"from model.embed_tokens.weight (in {reader.where('lm_head.weight')})"
        )


def _place(x: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    if sharding is None:
        return jax.device_put(x)
    # Multi-host safe: every process holds the same host array and copies in only its shards.
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


# ------------------------------------------------------------------------------------- writing


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r}; expected bytes or e.g. '5GB', '500MB'")
    unit = (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    return int(float(match.group(1)) * base**power)


def _to_host(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _hf_tensors(
    config: ModelConfig, params: dict, entries: list[Entry], np_dtype: np.dtype
) -> Iterator[tuple[str, np.ndarray]]:
    """HF (name, tensor) pairs, one stacked param on the host at a time."""
    for entry in entries:
        stacked = _to_host(_get(params, entry.ours, "params"))
        for i, name in enumerate(entry.hf_names(config)):
            value = stacked[i] if entry.per_layer else stacked
            yield name, entry.to_hf(value.astype(np_dtype, copy=False), config)
        del stacked


def _check_params(config: ModelConfig, params: dict, entries: list[Entry]) -> None:
    expected = {e.ours: e for e in entries}
    found = set(_leaf_paths(params))
    missing, unexpected = sorted(expected.keys() - found), sorted(found - expected.keys())
    if missing:
        raise CheckpointError(f"params: missing entry {missing[0]!r}")
    if unexpected:
        raise CheckpointError(f"params: unexpected entry {unexpected[0]!r} for this ModelConfig")
    for path, entry in expected.items():
        shape = tuple(_get(params, path, "params").shape)
        if shape != entry.stacked_shape(config):
            raise CheckpointError(
                f"params {path}: expected shape {entry.stacked_shape(config)}, found {shape}"
            )


def _leaf_paths(tree: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaf_paths(value, f"{prefix}{key}/")
    else:
        yield prefix[:-1]


def _write_weights(
    out: pathlib.Path,
    config: ModelConfig,
    params: dict,
    entries: list[Entry],
    np_dtype: np.dtype,
    max_shard_size: int,
) -> None:
    """Safetensors shards of at most ``max_shard_size`` bytes (a bigger tensor gets its own);
    one shard is ``model.safetensors``, more are ``model-0000i-of-0000n.safetensors`` + index."""
    from safetensors.numpy import save_file

    # Plan shard boundaries from shapes first: file names need the shard count.
    sizes = [
        (name, math.prod(_dims(e.hf_shape, config)) * np_dtype.itemsize)
        for e in entries
        for name in e.hf_names(config)
    ]
    plan: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if plan[-1] and used + nbytes > max_shard_size:
            plan.append([])
            used = 0
        plan[-1].append(name)
        used += nbytes
    n = len(plan)
    files = (
        [SAFETENSORS_NAME]
        if n == 1
        else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    )
    shard_of = {name: k for k, names in enumerate(plan) for name in names}
    buffer: dict[str, np.ndarray] = {}
    current = 0
    for name, tensor in _hf_tensors(config, params, entries, np_dtype):
        if shard_of[name] != current:
            save_file(buffer, str(out / files[current]), metadata={"format": "pt"})
            buffer, current = {}, shard_of[name]
        buffer[name] = tensor
    save_file(buffer, str(out / files[current]), metadata={"format": "pt"})
    if n > 1:
        index = {
            "metadata": {"total_size": sum(nbytes for _, nbytes in sizes)},
            "weight_map": {name: files[shard_of[name]] for name, _ in sizes},
        }
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class _TokenizerExport:
    """What ``save_hf(..., tokenizer=...)`` puts into the exported directory."""

    copies: dict[str, pathlib.Path]  # file name in the export -> source file
    writes: dict[str, str]  # file name in the export -> contents (see `_hf_tokenizer_files`)
    generation: dict[str, Any]  # generation_config.json; its special ids also go to config.json


def _tokenizer_export(tokenizer: str | os.PathLike) -> _TokenizerExport:
    """Tokenizer files, special token ids and, when the source has no ``tokenizer_config.json``,
    the files with which transformers tokenises as jaxalign does.

    A single file is shipped as ``tokenizer.json`` (``*.json``) or ``tokenizer.model``
    (SentencePiece), the names transformers looks for. The special ids come from the source
    directory's ``generation_config.json``, else its ``config.json``, else the tokenizer itself
    (`jaxalign.data.load_tokenizer`: the ids training used).
    """
    source = pathlib.Path(tokenizer)
    if source.is_file():
        copies = {("tokenizer.json" if source.suffix == ".json" else "tokenizer.model"): source}
        generation = {}
    elif source.is_dir():
        copies = {f: source / f for f in TOKENIZER_FILES if (source / f).is_file()}
        if not copies:
            raise CheckpointError(
                f"tokenizer={source}: contains none of the tokenizer files {list(TOKENIZER_FILES)}"
            )
        generation = _source_generation_config(source)
    else:
        raise CheckpointError(f"tokenizer={source}: no such file or directory")
    writes = {}
    if not generation or "tokenizer_config.json" not in copies:
        tok = _load_tokenizer(source)
        if not generation:
            generation = {"bos_token_id": tok.bos_id} if tok.bos_id >= 0 else {}
            generation |= {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
        if "tokenizer_config.json" not in copies:
            writes = _hf_tokenizer_files(tok)
            copies = {name: file for name, file in copies.items() if name not in writes}
    return _TokenizerExport(copies, writes, generation)


def _source_generation_config(source: pathlib.Path) -> dict[str, Any]:
    """The directory's generation_config.json, else the special ids of its config.json, else {}."""
    if (source / "generation_config.json").is_file():
        return _read_json(source / "generation_config.json")
    if (source / "config.json").is_file():
        hf = _read_json(source / "config.json")
        return {k: hf[k] for k in SPECIAL_ID_KEYS if hf.get(k) is not None}
    return {}


def _load_tokenizer(source: pathlib.Path):
    from jaxalign.data.tokenizers import load_tokenizer

    try:
        return load_tokenizer(str(source))
    except Exception as e:  # sentencepiece raises RuntimeError, tokenizers a bare Exception
        raise CheckpointError(f"tokenizer={source}: cannot be loaded ({e})") from None


def _hf_tokenizer_files(tok) -> dict[str, str]:
    """Files (name -> text) with which ``AutoTokenizer.from_pretrained`` alone encodes a prompt as
    jaxalign does, ``[BOS] + encode(text)`` (no EOS), and knows the special tokens.

    SentencePiece: a ``tokenizer_config.json`` for ``LlamaTokenizer``, whose ``add_bos_token``
    / ``add_eos_token`` set the BOS handling and whose ``add_prefix_space`` mirrors the model's
    ``add_dummy_prefix``. ``tokenizer.json``: transformers 5 ignores ``add_bos_token`` when a
    ``tokenizer.json`` is present, so the BOS handling goes into that file's post-processor
    (rewritten as ``[BOS] $A``, or ``$A`` without a BOS), with a ``tokenizer_config.json`` for
    ``PreTrainedTokenizerFast`` naming the special tokens.
    """
    from jaxalign.data.tokenizers import SentencePieceTokenizer

    if isinstance(tok, SentencePieceTokenizer):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=tok.path)
        token = sp.id_to_piece
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": tok.bos_id >= 0,
            "add_eos_token": False,
            # add_dummy_prefix on: "a" encodes to "▁a" (or "▁", "a").
            "add_prefix_space": sp.encode("a", out_type=str)[0].startswith("▁"),
            "unk_token": token(sp.unk_id()),
        }
        files = {}
    else:
        import tokenizers

        backend = tokenizers.Tokenizer.from_file(tok.path)
        token = backend.id_to_token
        bos = [(token(tok.bos_id), tok.bos_id)] if tok.bos_id >= 0 else []
        first = f"{bos[0][0]}:0 " if bos else ""
        second = f"{bos[0][0]}:1 " if bos else ""
        backend.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{first}$A:0", pair=f"{first}$A:0 {second}$B:1", special_tokens=bos
        )
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        files = {"tokenizer.json": backend.to_str(pretty=True)}
    config |= {
        "bos_token": token(tok.bos_id) if tok.bos_id >= 0 else None,
        "eos_token": token(tok.eos_id),
        "pad_token": token(tok.pad_id),
        "clean_up_tokenization_spaces": False,
    }
    return files | {"tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False)}


def _write_json(file: pathlib.Path, value: dict) -> None:
    file.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def save_hf(
    config: ModelConfig,
    params: dict,
    path: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    *,
    dtype: Any = None,
    max_shard_size: int | str = "5GB",
    architecture: str | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes a complete Hugging Face directory that ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` load with no further arguments.

    Contents: safetensors weights (sharded above ``max_shard_size``, with
    ``model.safetensors.index.json``), ``config.json``, ``generation_config.json`` and, when
    ``tokenizer`` is a tokenizer file (SentencePiece ``.model`` or ``tokenizer.json``) or a
    directory (e.g. the original HF model directory), its tokenizer files. The special token ids
    (``bos_token_id``, ``eos_token_id``, ``pad_token_id``; in both config files, so ``generate``
    stops at EOS) come from that directory's generation_config.json or config.json, else from the
    tokenizer itself; when the source has no ``tokenizer_config.json`` one is written so that the
    exported tokenizer adds BOS exactly as jaxalign's pipelines do (see `_tokenizer_config`).
    ``dtype``: stored dtype (default: the params' dtype). ``architecture``: the HF class to write
    (default inferred from the config, see ``family_for``). The directory is built under a
    temporary sibling name and renamed into place, so a failure leaves nothing behind; files and
    directory get the modes the process umask gives. An existing ``path`` is an error unless
    ``overwrite``. In multi-host runs every process must call this (params are gathered); only
    process 0 writes.
    """
    path = pathlib.Path(path).absolute()
    family = family_for(config, architecture)
    entries = family.entries(config)
    _check_params(config, params, entries)
    if dtype is None:
        dtype = params["embed"]["embedding"].dtype
    dtype = _resolve_dtype(dtype, "save_hf")
    limit = _parse_size(max_shard_size)
    if path.exists() and not overwrite:
        raise CheckpointError(
            f"{path}: already exists (replace it with --overwrite, or overwrite=True in Python)"
        )
    export = _tokenizer_export(tokenizer) if tokenizer is not None else None
    writer = jax.process_index() == 0
    if not writer:  # take part in the gathers only
        for _ in _hf_tensors(config, params, entries, _DTYPES[dtype]):
            pass
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # mode 0o777 minus the umask
    try:
        _write_weights(tmp, config, params, entries, _DTYPES[dtype], limit)
        generation = export.generation if export is not None else {}
        hf_config = config_to_hf(config, family, dtype)
        hf_config |= {k: generation[k] for k in SPECIAL_ID_KEYS if k in generation}
        _write_json(tmp / "config.json", hf_config)
        _write_json(tmp / "generation_config.json", generation)
        if export is not None:
            for name, file in export.copies.items():
                shutil.copyfile(file, tmp / name)
            for name, text in export.writes.items():
                (tmp / name).write_text(text + "\n")
        # safetensors creates its files 0o600; give every file the umask's mode, as open() would.
        file_mode = stat.S_IMODE(tmp.stat().st_mode) & 0o666
        for file in tmp.iterdir():
            file.chmod(file_mode)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
