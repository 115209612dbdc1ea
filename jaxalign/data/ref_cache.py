"""Cached reference log-probs: compute the frozen reference policy's sequence log-probs of a pairs
(or single-response) dataset once (`jaxalign cache-ref`), then join them back into the records so
training runs no reference forward and holds no reference weights.

File format (JSONL, written atomically): a header line, then one line per distinct record,

    {"format": "jaxalign-ref-cache/1", "settings": {...}}
    {"key": "<sha256 hex>", "ref_chosen_logps": -3.25, "ref_rejected_logps": -7.5,
     "ref_chosen_prefix_logps": -3.25, "ref_rejected_prefix_logps": -4.0}

A cache of single-response records (SFT or unpaired records of the unpaired family, e.g. PoFT's
aligned-model log-probs) holds `SINGLE_CACHE_FIELDS` instead, ``{"key": ..., "ref_logps": -5.5}``,
and names them in its header (``"fields": ["ref_logps"]``; a header without ``fields`` holds
`CACHE_FIELDS`).

The key is `record_key(record)`: the SHA-256 of the record's canonical JSON (sorted keys, no
whitespace; the cache fields themselves excluded), taken after the pipeline's other record
transforms, so the join works whatever the file order, shuffling, packing or streaming, and
identical records share one entry. Values are float32 numbers written with Python's shortest
round-trip repr, so the joined values are bit-identical to the computed ones. `settings` records
what the numbers depend on (tokenizer, template, lengths, masking, reference weights); the join
refuses a cache whose settings differ from the run's. ``*_prefix_logps`` are the sums over the
first min(|y_w|, |y_l|) response tokens (LD-DPO).

`join_ref_logps` is a record-level transform (dict -> [dict]) adding the four fields; the pair
pipeline carries them as per-pair float32 arrays (``extra_fields=CACHE_FIELDS``). A record missing
from the cache fails at startup naming the file and line (`JsonlSource` validates every record).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Iterable

from jaxalign.data.errors import DataError, RecordError
from jaxalign.data.layout import CACHE_FIELDS, SINGLE_CACHE_FIELDS

FORMAT = "jaxalign-ref-cache/1"


def record_key(record: dict) -> str:
    """SHA-256 hex digest of the record's canonical JSON, cache fields excluded."""
    body = {
        k: v for k, v in record.items() if k not in CACHE_FIELDS and k not in SINGLE_CACHE_FIELDS
    }
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_ref_cache(
    path: str | os.PathLike,
    entries: Iterable[tuple[str, tuple[float, ...]]],
    settings: dict,
    fields: tuple[str, ...] = CACHE_FIELDS,
) -> int:
    """Write (key, values in `fields` order) entries; returns the number of distinct keys.
    Written to a temporary file in the same directory, then renamed."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seen = set()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            header = {"format": FORMAT, "settings": settings}
            if fields != CACHE_FIELDS:
                header["fields"] = list(fields)
            f.write(json.dumps(header) + "\n")
            for key, values in entries:
                if key in seen:
                    continue
                seen.add(key)
                line = {"key": key} | dict(zip(fields, map(float, values), strict=True))
                f.write(json.dumps(line) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return len(seen)


def load_ref_cache(path: str | os.PathLike) -> tuple[dict, dict[str, dict[str, float]]]:
    """(settings, {key: {field: value}}), the fields those its header names."""
    path = str(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: reference cache not found (make it with `jaxalign cache-ref`)")
    with open(path, encoding="utf-8") as f:
        header = json.loads(f.readline() or "{}")
        if header.get("format") != FORMAT:
            raise DataError(f"{path} line 1: not a {FORMAT} header")
        fields = tuple(header.get("fields", CACHE_FIELDS))
        table = {}
        for line_no, line in enumerate(f, start=2):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                table[rec["key"]] = {k: float(rec[k]) for k in fields}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DataError(f"{path} line {line_no}: bad cache entry ({e})") from None
    return header["settings"], table


def join_ref_logps(record: dict, *, table: dict, path: str) -> list[dict]:
    """The record with its cached reference log-probs added (the cache's fields)."""
    values = table.get(record_key(record))
    if values is None:
        raise RecordError(
            "ref_logps",
            f"has no entry in the reference cache {path}",
            "the cache made by `jaxalign cache-ref` from this data and config",
        )
    return [record | values]


def make_ref_join(
    path: str, settings: dict | None = None, fields: tuple[str, ...] = CACHE_FIELDS
) -> functools.partial:
    """`join_ref_logps` bound to the cache at `path`; `settings` (when given) must equal the
    cache's, else a DataError names the differing ones; its entries must hold `fields` (a pairs
    cache for a pair run, a single-response cache for an unpaired run)."""
    saved, table = load_ref_cache(path)
    held = tuple(next(iter(table.values()), dict.fromkeys(fields)))
    if held != tuple(fields):
        raise DataError(
            f"{path}: reference cache holds {list(held)}, this run reads {list(fields)} "
            "(a cache of pairs for the paired trainer, of single responses for the unpaired one)"
        )
    if settings is not None:
        diff = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if diff:
            raise DataError(
                f"{path}: reference cache made with other settings (cached, now): {diff}; "
                "rerun `jaxalign cache-ref`"
            )
    return functools.partial(join_ref_logps, table=table, path=str(path))
