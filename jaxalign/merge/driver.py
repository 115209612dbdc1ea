"""`jaxalign merge`: merge Hugging Face directories or jaxalign checkpoints tensor by tensor
into a Hugging Face directory.

A config (``configs/merge/*.py``, keys in `merge_config`) names the method, the base and the
models (``hf:DIR`` or ``checkpoint:RUN``) with a weight and density each. Every model must have
the base's architecture: the same tensors with the same shapes (checked for all tensors, from
the safetensors headers, before any is read) and the same model config. Then, tensor by tensor
in the Hugging Face layout, the inputs' tensors are read, merged (`methods.merge_tensor`) and
appended to the output file, whose safetensors header is written first from the known shapes:
an ``hf:`` input is read lazily with ``safe_open`` (mmap), one tensor at a time, so the host
holds about one tensor per input model plus the output tensor. A ``checkpoint:`` input is
loaded whole once (Orbax restores a whole params tree) and sliced per tensor: it costs one copy
of that model for the whole merge. The directory is written under a temporary sibling name and
renamed into place.

Method ``restore`` (restore-alignment, `methods.restore`) takes the aligned model as the base and
the fine-tuned model as the one model, and writes the fine-tuned model with the tensors its
``restore`` rule chooses reset to the base's values. A ``top_k`` or ``fraction`` rule first reads
the two models once more, tensor by tensor, for the relative changes ``|x - b| / |b|``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import resource
import secrets
import shutil
import struct
import sys
from collections.abc import Iterator
from contextlib import ExitStack

import jax
import ml_dtypes
import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

from jaxalign.checkpoint import hf
from jaxalign.errors import CheckpointError, ConfigError
from jaxalign.merge import methods
from jaxalign.models.config import ModelConfig

_ST_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float16): "F16",
}


def merge_config() -> ConfigDict:
    """Every key a merge config may set, with its default."""
    c = ConfigDict()
    # linear | task_arithmetic | ties | dare | dare_ties | slerp | tsv | r_tsvm | restore
    c.method = ""
    # "hf:DIR" | "checkpoint:RUN" (linear: optional; slerp: the t = 0 end; restore: the aligned
    # model whose values are restored)
    c.base = ""
    # One entry per model: {"model": "hf:DIR" | "checkpoint:RUN", "weight": w_i (default 1),
    # "density": d_i (ties, dare, dare_ties; default 1)}. slerp: exactly one (the t = 1 end);
    # restore: exactly one (the fine-tuned model).
    c.models = ()
    c.lam = 1.0  # task_arithmetic, ties, dare, dare_ties: b + lam * (merged task vector)
    c.t = 0.5  # slerp
    c.normalize = True  # linear: divide by the sum of weights
    c.seed = 0  # dare, dare_ties: the drop masks
    c.dtype = ""  # stored dtype of the output: float32 | bfloat16 | float16 ("" = the base's)
    # Tokenizer file or directory shipped with the output ("" = the base's: an hf: directory's
    # tokenizer files, a run's recorded tokenizer; none if it has none)
    c.tokenizer = ""
    # restore: exactly one rule choosing the tensors reset to the base (methods.RestoreRule)
    c.restore = ConfigDict()
    c.restore.pattern = ""  # a regex searched in each Hugging Face tensor name
    c.restore.top_k = 0  # the k tensors of largest relative change |x - b| / |b|
    c.restore.fraction = 0.0  # in (0, 1]: the largest-change tensors holding this share of entries
    # tsv (methods.tsv): b + alpha * (the orthogonalised top singular triplets of each w_i tau_i)
    c.tsv = ConfigDict()
    c.tsv.rank_fraction = 0.0  # in (0, 1]: share of min(m, n) kept per task (0 = 1 / len(models))
    c.tsv.alpha = 1.0
    # r_tsvm (methods.r_tsvm): tsv on task matrices winsorised at a quantile, adaptive ranks
    c.r_tsvm = ConfigDict()
    c.r_tsvm.outlier_quantile = 0.99  # in (0, 1]: |entries| above this quantile are clipped to it
    c.r_tsvm.energy = 0.9  # in (0, 1]: share of sum sigma^2 the kept triplets of a task hold
    c.r_tsvm.alpha = 1.0
    return c


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checked merge config: ``specs[0]`` is the base (None when absent), the rest the models."""

    method: str
    base: str | None
    models: tuple[str, ...]
    options: methods.MergeOptions
    dtype: str
    tokenizer: str
    restore: methods.RestoreRule | None


def check_config(config: ConfigDict, source: str = "merge config") -> Plan:
    """The `Plan` of a merge config; unknown keys, methods and bad values raise ConfigError."""
    known = merge_config()
    for key in config.keys():
        if key not in known:
            raise ConfigError(f'{source}: unknown key "{key}" (known: {", ".join(known.keys())})')
    if config.method not in (*methods.METHODS, "restore"):
        raise ConfigError(
            f"{source}: method {config.method!r} is unknown (known: "
            f"{', '.join(methods.METHODS)}, restore)"
        )
    if not config.models:
        raise ConfigError(f"{source}: models is empty; list at least one model")
    specs, weights, densities = [], [], []
    for i, entry in enumerate(config.models):
        where = f"{source}: models[{i}]"
        if not isinstance(entry, dict | ConfigDict) or "model" not in entry:
            raise ConfigError(f'{where}: expected {{"model": "hf:DIR", "weight": .., ...}}')
        unknown = set(entry.keys()) - {"model", "weight", "density"}
        if unknown:
            raise ConfigError(f'{where}: unknown key "{sorted(unknown)[0]}"')
        specs.append(_spec(entry["model"], where))
        weights.append(float(entry.get("weight", 1.0)))
        densities.append(float(entry.get("density", 1.0)))
        if not 0.0 < densities[-1] <= 1.0:
            raise ConfigError(f"{where}: density {densities[-1]} not in (0, 1]")
    needs_base = config.method != "linear"
    if needs_base and not config.base:
        raise ConfigError(f"{source}: method {config.method} needs a base model (key base)")
    if config.method in ("slerp", "restore") and len(specs) != 1:
        raise ConfigError(f"{source}: {config.method} merges the base with exactly one model")
    restore = _restore_rule(config, source)
    tsv, r_tsvm = _method_keys(config, source, "tsv"), _method_keys(config, source, "r_tsvm")
    if not 0.0 <= tsv["rank_fraction"] <= 1.0:
        raise ConfigError(
            f"{source}: tsv.rank_fraction {tsv['rank_fraction']} not in (0, 1] (0 = 1 / number "
            "of models)"
        )
    for key in ("outlier_quantile", "energy"):
        if not 0.0 < r_tsvm[key] <= 1.0:
            raise ConfigError(f"{source}: r_tsvm.{key} {r_tsvm[key]} not in (0, 1]")
    if config.method == "linear" and config.normalize and sum(weights) == 0:
        raise ConfigError(f"{source}: the weights sum to 0; linear with normalize divides by it")
    if config.dtype and config.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"{source}: dtype {config.dtype!r}; expected float32|bfloat16|float16")
    options = methods.MergeOptions(
        weights=tuple(weights),
        densities=tuple(densities),
        lam=float(config.lam),
        t=float(config.t),
        normalize=bool(config.normalize),
        seed=int(config.seed),
        rank_fraction=tsv["rank_fraction"],
        alpha=r_tsvm["alpha"] if config.method == "r_tsvm" else tsv["alpha"],
        outlier_quantile=r_tsvm["outlier_quantile"],
        energy=r_tsvm["energy"],
    )
    base = _spec(config.base, f"{source}: base") if config.base else None
    return Plan(config.method, base, tuple(specs), options, config.dtype, config.tokenizer, restore)


def _restore_rule(config: ConfigDict, source: str) -> methods.RestoreRule | None:
    """The checked `methods.RestoreRule` of method restore (None for the other methods)."""
    r = config.get("restore", ConfigDict())
    unknown = sorted(set(r.keys()) - set(merge_config().restore.keys()))
    if unknown:
        raise ConfigError(
            f'{source}: unknown key "restore.{unknown[0]}" (known: pattern, top_k, fraction)'
        )
    rule = methods.RestoreRule(
        pattern=str(r.get("pattern", "")),
        top_k=int(r.get("top_k", 0)),
        fraction=float(r.get("fraction", 0.0)),
    )
    chosen = [k for k in ("pattern", "top_k", "fraction") if getattr(rule, k)]
    if config.method != "restore":
        if chosen:
            raise ConfigError(f"{source}: restore.{chosen[0]} is a key of method restore only")
        return None
    if len(chosen) != 1:
        raise ConfigError(
            f"{source}: method restore needs exactly one of restore.pattern, restore.top_k, "
            f"restore.fraction (set: {', '.join(chosen) or 'none'})"
        )
    if rule.pattern:
        try:
            re.compile(rule.pattern)
        except re.error as e:
            raise ConfigError(
                f"{source}: restore.pattern {rule.pattern!r} is not a regex ({e})"
            ) from None
    if rule.top_k < 0:
        raise ConfigError(f"{source}: restore.top_k {rule.top_k}; expected a count >= 1")
    if not 0.0 <= rule.fraction <= 1.0:
        raise ConfigError(f"{source}: restore.fraction {rule.fraction} not in (0, 1]")
    return rule


def _method_keys(config: ConfigDict, source: str, method: str) -> dict[str, float]:
    """The keys of ``method``'s group (``tsv.*``, ``r_tsvm.*``) as floats; unknown keys, and keys
    set away from their defaults with another method, raise ConfigError."""
    given, known = config.get(method, ConfigDict()), merge_config()[method]
    unknown = sorted(set(given.keys()) - set(known.keys()))
    if unknown:
        raise ConfigError(
            f'{source}: unknown key "{method}.{unknown[0]}" (known: {", ".join(known.keys())})'
        )
    values = {key: float(given.get(key, default)) for key, default in known.items()}
    if config.method != method:
        for key, value in values.items():
            if value != known[key]:
                raise ConfigError(f"{source}: {method}.{key} is a key of method {method} only")
    return values


def _spec(spec: str, where: str) -> str:
    kind, _, path = str(spec).partition(":")
    if kind not in ("hf", "checkpoint") or not path:
        raise ConfigError(f"{where}: {spec!r}; expected hf:DIR or checkpoint:RUN")
    return spec


class _Source:
    """One input model's config and its tensors by Hugging Face name (see the module doc)."""

    def __init__(self, spec: str, stack: ExitStack):
        kind, _, path = spec.partition(":")
        self.spec, self.kind, self.path = spec, kind, pathlib.Path(path)
        if kind == "hf":
            self.config = hf.load_hf_config(path)
            self._reader = hf._SafetensorsReader(self.path, stack)
            self.family = hf.family_for(self.config, _architecture(self.path))
            self.resident_bytes = 0
        else:
            from jaxalign.checkpoint.convert import load_model_params

            self.config, params = load_model_params(path)
            self._params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
            self.resident_bytes = sum(x.nbytes for x in jax.tree.leaves(self._params))
            self.family = hf.family_for(self.config)
        self.entries = {
            name: (entry, i)
            for entry in self.family.entries(self.config)
            for i, name in enumerate(entry.hf_names(self.config))
        }

    def header(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        if self.kind == "hf":
            if name not in self._reader.files:
                raise CheckpointError(f"{name}: missing from {self.spec}")
            shape, dtype = self._reader.header(name)
            return shape, np.dtype(_NP_OF_ST.get(dtype, np.float32))
        entry, _ = self.entries[name]
        x = hf._get(self._params, entry.ours, "params")
        return hf._dims(entry.hf_shape, self.config), x.dtype

    def get(self, name: str) -> np.ndarray:
        if self.kind == "hf":
            return self._reader.get(name)
        entry, i = self.entries[name]
        x = hf._get(self._params, entry.ours, "params")
        return entry.to_hf(x[i] if entry.per_layer else x, self.config)


_NP_OF_ST = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}


def _architecture(path: pathlib.Path) -> str | None:
    archs = json.loads((path / "config.json").read_text()).get("architectures") or [None]
    return archs[0]


def check_compatible(base: _Source, other: _Source) -> None:
    """Same tensors with the same shapes (the first difference names the tensor), same config."""
    names, theirs = list(base.entries), set(other.entries)
    for name in names:
        if name not in theirs:
            raise CheckpointError(
                f"{name}: in the base {base.spec} but not in {other.spec} (a different "
                "architecture)"
            )
        shape, their_shape = base.header(name)[0], other.header(name)[0]
        if tuple(shape) != tuple(their_shape):
            raise CheckpointError(
                f"{name}: shape {tuple(their_shape)} in {other.spec}, {tuple(shape)} in the base "
                f"{base.spec} (a different architecture or vocabulary)"
            )
    extra = sorted(theirs - set(names))
    if extra:
        raise CheckpointError(f"{extra[0]}: in {other.spec} but not in the base {base.spec}")
    if base.family.architecture != other.family.architecture:
        raise CheckpointError(
            f"{other.spec}: architecture {other.family.architecture}, the base "
            f"{base.spec} is {base.family.architecture}"
        )
    ours, yours = _comparable(base.config), _comparable(other.config)
    for key in ours:
        if ours[key] != yours[key]:
            raise CheckpointError(
                f"{other.spec}: model config {key}={yours[key]!r}, the base {base.spec} has "
                f"{ours[key]!r}"
            )


def _comparable(config: ModelConfig) -> dict:
    skip = {"param_dtype", "dtype", "remat", "attention", "lora", "max_seq_len"}
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}


def _write_header(file, tensors: list[tuple[str, tuple[int, ...], np.dtype]]) -> None:
    """A safetensors header for tensors appended afterwards in this order: 8-byte little-endian
    header length, then the JSON header (name -> dtype, shape, data_offsets), space-padded to 8."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in tensors:
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": _ST_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    file.write(struct.pack("<Q", len(text)))
    file.write(text)


@dataclasses.dataclass(frozen=True)
class MergeReport:
    """What `merge` did: tensors merged, the output's bytes, the most bytes of tensors held at
    once (each input's tensor, the merged float32 tensor and its output-dtype copy, plus every
    ``checkpoint:`` input held whole), and the process's peak RSS (JAX's runtime included)."""

    n_tensors: int
    model_bytes: int
    peak_tensor_bytes: int
    peak_rss_bytes: int
    tokenizer: str | None
    restored: tuple[str, ...] | None  # method restore: the names reset to the base, in order


def merge(
    config: ConfigDict, out: str | os.PathLike, *, source: str = "merge config"
) -> MergeReport:
    """Runs a merge config (`merge_config`) and writes a Hugging Face directory at ``out``."""
    plan = check_config(config, source)
    out = pathlib.Path(out).absolute()
    if out.exists():
        raise CheckpointError(f"{out}: already exists; choose a new --out")
    with ExitStack() as stack:
        sources = [_Source(s, stack) for s in plan.models]
        base = _Source(plan.base, stack) if plan.base else None
        first = base or sources[0]
        for other in sources if base else sources[1:]:
            check_compatible(first, other)
        names = list(first.entries)
        dtype = (
            hf._DTYPES[plan.dtype] if plan.dtype else first.header("model.embed_tokens.weight")[1]
        )
        tokenizer = _tokenizer(plan, first)
        layout = [(name, tuple(first.header(name)[0]), dtype) for name in names]
        restored = _restored(plan, base, sources, layout) if plan.restore else None
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            file = tmp / hf.SAFETENSORS_NAME
            peak = _write_merged(file, plan, base, sources, layout, restored)
            peak += sum(s.resident_bytes for s in [*sources, *([base] if base else [])])
            _write_configs(tmp, first.config, first.family, dtype, tokenizer)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    model_bytes = sum(int(np.prod(s)) * d.itemsize for _, s, d in layout)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    restored = tuple(restored) if restored is not None else None
    return MergeReport(len(layout), model_bytes, peak, rss, tokenizer, restored)


def _restored(plan: Plan, base, sources, layout) -> list[str]:
    """The names method restore resets; a top_k or fraction rule reads each tensor pair once."""
    names = [name for name, _, _ in layout]
    if plan.restore.pattern:
        return methods.restore_selection(plan.restore, names)
    (source,) = sources
    changes = [
        methods.relative_change(base.get(name), source.get(name))
        for name in tqdm(names, desc="relative changes", unit="tensor", file=sys.stderr)
    ]
    sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape, _ in layout]
    return methods.restore_selection(plan.restore, names, changes, sizes)


def _merged(
    plan: Plan, base, sources, layout, restored: list[str] | None
) -> Iterator[tuple[str, np.ndarray, int]]:
    """(name, merged tensor in the output dtype, bytes of tensors held making it) in order."""
    chosen = set(restored or ())
    for name, _, dtype in layout:
        b = base.get(name) if base is not None else None
        xs = [s.get(name) for s in sources]
        held = sum(x.nbytes for x in xs) + (0 if b is None else b.nbytes)
        if plan.method == "restore":  # one of the inputs, as it is
            merged = b if name in chosen else xs[0]
        else:
            merged = np.asarray(methods.merge_tensor(plan.method, name, b, xs, plan.options))
            held += merged.nbytes
        out = merged.astype(dtype, copy=False)
        yield name, out, held + (out.nbytes if out is not merged else 0)


def _write_merged(file: pathlib.Path, plan: Plan, base, sources, layout, restored) -> int:
    peak = 0
    with open(file, "wb") as f:
        _write_header(f, layout)
        bar = tqdm(total=len(layout), desc=f"merge ({plan.method})", unit="tensor", file=sys.stderr)
        for name, tensor, held in _merged(plan, base, sources, layout, restored):
            f.write(np.ascontiguousarray(tensor).tobytes())
            peak = max(peak, held)
            bar.set_postfix_str(name, refresh=False)
            bar.update()
        bar.close()
    return peak


def _tokenizer(plan: Plan, first: _Source) -> str | None:
    """The tokenizer to ship: the config's, else the base's (an hf: directory's own files, a
    run's recorded tokenizer when that file exists), else None."""
    if plan.tokenizer:
        return plan.tokenizer
    if first.kind == "hf":
        has = any((first.path / f).is_file() for f in hf.TOKENIZER_FILES)
        return str(first.path) if has else None
    from jaxalign.checkpoint.convert import run_tokenizer

    recorded = run_tokenizer(first.path)
    return recorded if recorded and os.path.exists(recorded) else None


def _write_configs(tmp, config, family, dtype, tokenizer) -> None:
    export = hf._tokenizer_export(tokenizer) if tokenizer else None
    generation = export.generation if export is not None else {}
    name = {v: k for k, v in hf._DTYPES.items()}[dtype]
    hf_config = hf.config_to_hf(config, family, name)
    hf_config |= {k: generation[k] for k in hf.SPECIAL_ID_KEYS if k in generation}
    hf._write_json(tmp / "config.json", hf_config)
    hf._write_json(tmp / "generation_config.json", generation)
    if export is not None:
        for file_name, file in export.copies.items():
            shutil.copyfile(file, tmp / file_name)
        for file_name, text in export.writes.items():
            (tmp / file_name).write_text(text + "\n")
