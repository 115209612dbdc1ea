"""deita data selection (Liu et al., 2024, "What Makes Good Data for Alignment? A Comprehensive
Study of Automatic Data Selection in Instruction Tuning"), behind `jaxalign data select`.

Each record's score is complexity x quality (the paper's EVOL score: its complexity scorer's
score times its quality scorer's). Records are visited best score first (ties: file order) and
kept greedily when they are diverse enough, until `budget` are kept:

    keep i  iff  max_{j kept} cos(e_i, e_j) < max_similarity      (the first one is always kept)

The catalog phrases the rule as "cosine distance to the nearest kept example > 0.9"; the
reference implementation of the paper (hkust-nlp/deita, its Repr Filter) compares the cosine
*similarity* to the nearest kept example against threshold 0.9, which is the sense jaxalign
takes: `max_similarity=0.9` keeps an example whose cosine distance 1 - cos to every kept one
exceeds 0.1 (a distance above 0.9 would accept only near-orthogonal examples).

Complexity and quality are read from record fields (any scorer: the paper's LLaMA scorers, a
reward model's score written into the records). Embeddings come from a record field or from a
jaxalign / Hugging Face model: the mean over tokens of its last hidden state (`mean_hidden`,
the paper's sentence representation), of the text fields joined by a newline.
"""

from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from jaxalign import models as M
from jaxalign.errors import ConfigError, DataError
from jaxalign.train.workdir import write_atomic


def deita_scores(
    complexity: Float[ArrayLike, " N"], quality: Float[ArrayLike, " N"]
) -> Float[np.ndarray, " N"]:
    """score_i = complexity_i * quality_i (deita's EVOL score)."""
    return np.asarray(complexity, np.float64) * np.asarray(quality, np.float64)


def greedy_select(
    scores: Float[ArrayLike, " N"],
    embeddings: Float[ArrayLike, "N E"],
    *,
    budget: int,
    max_similarity: float = 0.9,
) -> Int[np.ndarray, " K"]:
    """Indices (in the order kept, K <= budget) of deita's score-first diverse selection: visit
    records by descending score (stable), keep i when max_{j kept} cos(e_i, e_j) <
    max_similarity, stop at `budget` kept."""
    if budget < 1:
        raise ConfigError(f"--budget {budget}: expected a number of records >= 1")
    if not -1.0 <= max_similarity <= 1.0:
        raise ConfigError(f"--max-similarity {max_similarity}: expected a cosine in [-1, 1]")
    e = np.asarray(embeddings, np.float64)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    unit = e / np.maximum(norms, 1e-12)
    kept: list[int] = []
    for i in np.argsort(-np.asarray(scores, np.float64), kind="stable"):
        if kept and (unit[kept] @ unit[i]).max() >= max_similarity:
            continue
        kept.append(int(i))
        if len(kept) == budget:
            break
    return np.asarray(kept, np.int64)


def mean_hidden(
    config: M.ModelConfig, params: M.Params, tokens: list[list[int]], *, batch_size: int = 16
) -> Float[np.ndarray, "N D"]:
    """The mean over each text's tokens of the model's last hidden state, [N, D] float32
    (texts padded right to the longest of their batch, padding masked out)."""

    @jax.jit
    def pooled(params, ids: Int[Array, "B T"], mask: Float[Array, "B T"]) -> Float[Array, "B D"]:
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
        hidden = M.forward(config, params, ids, positions, mask.astype(jnp.int32))
        hidden = hidden.astype(jnp.float32) * mask[..., None]
        return hidden.sum(axis=1) / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)

    out = []
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start : start + batch_size]
        T = max(len(t) for t in chunk)
        ids = np.zeros((batch_size, T), np.int32)
        mask = np.zeros((batch_size, T), np.float32)
        for row, t in enumerate(chunk):
            ids[row, : len(t)], mask[row, : len(t)] = t, 1.0
        out.append(np.asarray(pooled(params, ids, mask))[: len(chunk)])
    return np.concatenate(out)


def read_records(path: str) -> list[dict]:
    """The JSON objects of a JSONL file; a line that is not one is a DataError naming it."""
    records = []
    try:
        lines = pathlib.Path(path).read_text().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path} line {n}: expected a JSON object")
        records.append(rec | {"_line": n})
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _number(path: str, rec: dict, field: str) -> float:
    value = rec.get(field)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        what = "missing" if value is None else f"{value!r}"
        raise DataError(
            f'{path} line {rec["_line"]}: field "{field}" is {what} (expected a finite number)'
        )
    return float(value)


def record_numbers(path: str, records: list[dict], field: str) -> Float[np.ndarray, " N"]:
    """Field `field` of every record as numbers; a missing or non-numeric one is a DataError."""
    return np.array([_number(path, r, field) for r in records])


def record_embeddings(path: str, records: list[dict], field: str) -> Float[np.ndarray, "N E"]:
    """Field `field` (a list of E numbers, the same E for all) of every record."""
    rows = []
    for r in records:
        value = r.get(field)
        ok = (
            isinstance(value, list)
            and value
            and all(
                isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
                for x in value
            )
        )
        if not ok or (rows and len(value) != len(rows[0])):
            size = f" of {len(rows[0])}" if rows else ""
            raise DataError(
                f'{path} line {r["_line"]}: field "{field}" is not a list{size} finite numbers'
            )
        rows.append(value)
    return np.asarray(rows, np.float64)


def record_texts(path: str, records: list[dict], fields: tuple[str, ...]) -> list[str]:
    """The text fields of every record joined by a newline (the text a model embeds)."""
    texts = []
    for r in records:
        for f in fields:
            if not isinstance(r.get(f), str):
                raise DataError(
                    f'{path} line {r["_line"]}: field "{f}" is missing (expected a string)'
                )
        texts.append("\n".join(r[f] for f in fields))
    return texts


def write_selection(path: str, records: list[dict], kept: Int[np.ndarray, " K"]) -> None:
    """The kept records, in the order kept, as JSONL written atomically (temp file + rename)."""
    out = pathlib.Path(path)
    if not out.parent.is_dir():
        raise ConfigError(f"--out {path}: directory {out.parent} does not exist")
    lines = [json.dumps({k: v for k, v in records[i].items() if k != "_line"}) for i in kept]
    write_atomic(out, "".join(line + "\n" for line in lines))
