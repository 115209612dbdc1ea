"""Record sources with random access, validation and bad-record accounting.

`open_source(path, parse, ...)` picks the source from the path:

- a file, by its name: ``*.parquet`` Parquet; ``*.arrow`` Arrow IPC (the stream format Hugging Face
  ``datasets`` writes, or the file format); a name containing ``.array_record`` ArrayRecord (also
  TFDS-style ``train.array_record-00000-of-00008``); anything else JSONL;
- a directory: a ``datasets`` directory written by ``Dataset.save_to_disk`` (its ``state.json``
  lists the Arrow files, read in that order), else every data file in it (``*.jsonl``,
  ``*.parquet``, ``*.arrow``, ``*.array_record*``; sorted by name) as shards. A ``DatasetDict``
  directory (``dataset_dict.json``) is an error naming its splits: give one split's directory;
- a glob pattern (``*``, ``?``, ``[...]``, matched one path segment at a time): the matching files,
  sorted by name, as shards.

A path with a scheme (``gs://bucket/data/*.parquet``, ``s3://...``, ``file://...``) is listed and
read through pyarrow's filesystem layer (``pyarrow.fs``, which local paths use too); ArrayRecord
files are opened by Grain's ``ArrayRecordDataSource`` (array_record's own file layer); JSONL files
must be local.

Every source is a random-access source (``len`` / ``__getitem__``, the Grain protocol) of the valid
records, each passed through the record-level transforms and the parser. Every record is read and
validated up front, so a malformed record fails at startup, not at step 10 000, naming the file and
the line (JSONL, counted from 1) or row (Parquet, Arrow and ArrayRecord, counted from 0 as
``pyarrow`` and ``datasets`` index them):

  data/pairs.jsonl line 1207: field "rejected" is missing (expected a string or a list of messages)
  data/train-00003.parquet row 17: field "chosen" has type int (expected a string or a list ...)

With ``skip_bad_records=True`` bad records are skipped instead; `num_bad_records` counts them and
`bad_record_messages` keeps the first few messages for logging. Blank JSONL lines are ignored. A
file (or shard) without any valid record is an error.

What stays in memory: JSONL, byte offsets only (each record is re-read from disk on access); Arrow
files, memory-mapped when local; Parquet, the decoded table (Arrow columns, about the size of the
uncompressed data); ArrayRecord, its index. ArrayRecord records are JSON-encoded dicts (UTF-8
bytes), e.g. written by ``array_record.python.array_record_module.ArrayRecordWriter(path,
"group_size:1")`` with ``writer.write(json.dumps(record).encode())``.
Arrow and Parquet rows are dicts of their columns (a message list is a list of structs).

Record-level transforms (e.g. `jaxalign.data.transforms.reward_augment`) map one raw record (dict)
to a list of records; they must be deterministic. A record that becomes k records occupies k
indices. Sources pickle without their open files (Grain worker processes reopen them).
"""

from __future__ import annotations

import array
import fnmatch
import json
import os
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jaxalign.data.errors import DataError, RecordError

RecordTransform = Callable[[dict], list[dict]]
_KEEP_MESSAGES = 10
_GLOB_CHARS = "*?["
_DATA_SUFFIXES = (".jsonl", ".parquet", ".arrow")


def _expand(rec: dict, transforms: Sequence[RecordTransform], parse: Callable) -> list[dict]:
    """One raw record -> its transformed, parsed examples (RecordError on a bad one)."""
    recs = [rec]
    for t in transforms:
        recs = [out for r in recs for out in t(r)]
    return [parse(r) for r in recs]


def _count_valid(source, records: Callable[[], list], skip_bad_records: bool) -> int:
    """``len(records())``; a bad record raises, or counts as 0 and is noted on `source` when
    skipping."""
    try:
        return len(records())
    except DataError as e:
        if not skip_bad_records:
            raise
        source.num_bad_records += 1
        if len(source.bad_record_messages) < _KEEP_MESSAGES:
            source.bad_record_messages.append(str(e))
        return 0


def _no_records(path: str, num_bad: int) -> DataError:
    why = f"all {num_bad} malformed, skipped" if num_bad else "empty"
    return DataError(f"{path}: no records ({why})")


class JsonlSource:
    """Random-access view of a JSONL file's valid records, each passed through `parse`.

    Args:
      path: the ``.jsonl`` file (local).
      parse: raw record (dict) -> normalised example; raises `RecordError` on a bad record.
      transforms: record-level transforms applied in order before `parse` (dict -> list of dicts).
      skip_bad_records: skip (and count) malformed records instead of raising `DataError`.
    """

    def __init__(
        self,
        path: str,
        parse: Callable[[dict], dict],
        *,
        transforms: Sequence[RecordTransform] = (),
        skip_bad_records: bool = False,
    ):
        self.path = str(path)
        self._parse = parse
        self._transforms = tuple(transforms)
        self.num_bad_records = 0
        self.bad_record_messages: list[str] = []
        if not os.path.exists(self.path):
            raise DataError(f"{self.path}: file not found")
        if os.path.isdir(self.path):
            raise DataError(f"{self.path}: is a directory (expected a JSONL file)")
        # compact int64 arrays: a few bytes per record even for files with millions of lines
        offsets, lengths, subs, lines = (array.array("q") for _ in range(4))
        offset = 0
        with open(self.path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                n = len(line)
                if line.strip():
                    count = _count_valid(
                        self,
                        lambda line=line, line_no=line_no: self._records(line, line_no),
                        skip_bad_records,
                    )
                    for sub in range(count):
                        offsets.append(offset)
                        lengths.append(n)
                        subs.append(sub)
                        lines.append(line_no)
                offset += n
        self._offsets = np.asarray(offsets, np.int64)
        self._lengths = np.asarray(lengths, np.int64)
        self._subs = np.asarray(subs, np.int64)
        self._lines = np.asarray(lines, np.int64)
        self._fd: int | None = None
        if not len(self._offsets):
            raise _no_records(self.path, self.num_bad_records)

    def _records(self, line: bytes, line_no: int) -> list[dict]:
        """Decode, transform and parse one line; raises DataError naming file and line."""
        try:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                msg = f"bad JSON ({e.msg} at character {e.pos + 1})"
                raise DataError(f"{self.path} line {line_no}: {msg}") from None
            except UnicodeDecodeError as e:
                raise DataError(f"{self.path} line {line_no}: not UTF-8 ({e.reason})") from None
            if not isinstance(rec, dict):
                raise DataError(
                    f"{self.path} line {line_no}: expected a JSON object, got {type(rec).__name__}"
                )
            return _expand(rec, self._transforms, self._parse)
        except RecordError as e:
            raise DataError(f"{self.path} line {line_no}: {e}") from None

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> dict:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        line = os.pread(self._fd, int(self._lengths[index]), int(self._offsets[index]))
        return self._records(line, int(self._lines[index]))[int(self._subs[index])]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fd"] = None  # file descriptors do not travel to worker processes
        return state

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


class RowSource:
    """Random-access view of the valid records of one Parquet, Arrow or ArrayRecord file.

    Args as in `JsonlSource`; `path` may be remote (module doc). Row r of the file is the raw
    record (a dict of the row's columns; for ArrayRecord the JSON object record r holds).
    """

    def __init__(
        self,
        path: str,
        parse: Callable[[dict], dict],
        *,
        transforms: Sequence[RecordTransform] = (),
        skip_bad_records: bool = False,
    ):
        self.path = str(path)
        self.kind = _kind(self.path)
        if self.kind == "jsonl":
            raise ValueError(f"{self.path}: not a Parquet, Arrow or ArrayRecord file name")
        self._parse = parse
        self._transforms = tuple(transforms)
        self.num_bad_records = 0
        self.bad_record_messages: list[str] = []
        self._data = None
        rows, subs = array.array("q"), array.array("q")
        for row, raw in enumerate(self._all_raw()):
            count = _count_valid(
                self, lambda raw=raw, row=row: self._records(raw, row), skip_bad_records
            )
            rows.extend([row] * count)
            subs.extend(range(count))
        self._rows = np.asarray(rows, np.int64)
        self._subs = np.asarray(subs, np.int64)
        if not len(self._rows):
            raise _no_records(self.path, self.num_bad_records)

    def _open(self):
        """The file's table (Parquet, Arrow) or ArrayRecord data source, opened once."""
        if self._data is None and self.kind == "array_record":
            self._data = _open_array_record(self.path)
        elif self._data is None:
            self._data = _read_table(self.path, self.kind)
        return self._data

    def _all_raw(self):
        """Every row's raw value in order, read in chunks."""
        data = self._open()
        if self.kind == "array_record":
            for start in range(0, len(data), 1024):
                yield from data.__getitems__(range(start, min(start + 1024, len(data))))
        else:
            for batch in data.to_batches(max_chunksize=1024):
                yield from batch.to_pylist()

    def _raw(self, row: int):
        data = self._open()
        return data[row] if self.kind == "array_record" else data.slice(row, 1).to_pylist()[0]

    def _records(self, raw, row: int) -> list[dict]:
        """Decode (ArrayRecord), transform and parse one row; DataError naming file and row."""
        where = f"{self.path} row {row}"
        if self.kind == "array_record":
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: bad JSON ({e.msg} at character {e.pos + 1})") from None
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 ({e.reason})") from None
            if not isinstance(raw, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        try:
            return _expand(raw, self._transforms, self._parse)
        except RecordError as e:
            raise DataError(f"{where}: {e}") from None

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict:
        row = int(self._rows[index])
        return self._records(self._raw(row), row)[int(self._subs[index])]

    def __getstate__(self):
        return self.__dict__ | {"_data": None}  # reopened where it is used


class ShardedSource:
    """Several sources (shards) read as one: index i runs through shard 0, then shard 1, ..."""

    def __init__(self, path: str, shards: Sequence):
        self.path = str(path)
        self.shards = list(shards)
        self._ends = np.cumsum([len(s) for s in self.shards])

    @property
    def num_bad_records(self) -> int:
        return sum(s.num_bad_records for s in self.shards)

    @property
    def bad_record_messages(self) -> list[str]:
        return [m for s in self.shards for m in s.bad_record_messages][:_KEEP_MESSAGES]

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, index: int) -> dict:
        k = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[k - 1]) if k else 0
        return self.shards[k][index - start]


Source = JsonlSource | RowSource | ShardedSource


def open_source(
    path: str,
    parse: Callable[[dict], dict],
    *,
    transforms: Sequence[RecordTransform] = (),
    skip_bad_records: bool = False,
) -> Source:
    """The source of the records at `path` (a file, directory, glob, local or remote; module doc).

    Args:
      path: where the data is.
      parse: raw record (dict) -> normalised example; raises `RecordError` on a bad record.
      transforms: record-level transforms applied in order before `parse`.
      skip_bad_records: skip (and count) malformed records instead of raising `DataError`.
    """
    path = str(path)
    options = {"transforms": transforms, "skip_bad_records": skip_bad_records}
    files = _shard_files(path)
    if files is None:
        return _open_file(path, parse, options)
    return ShardedSource(path, [_open_file(f, parse, options) for f in files])


def _open_file(path: str, parse, options: dict):
    if _kind(path) != "jsonl":
        return RowSource(path, parse, **options)
    if "://" in path:
        raise DataError(
            f"{path}: JSONL is read from local files only (copy it here, or convert it to "
            "Parquet or ArrayRecord)"
        )
    return JsonlSource(path, parse, **options)


def _kind(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    if ".array_record" in name:
        return "array_record"
    return "jsonl"


def _is_data_file(name: str) -> bool:
    return not name.startswith((".", "_")) and (
        name.endswith(_DATA_SUFFIXES) or ".array_record" in name
    )


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, its path) for a local path or a URI such as gs://bucket/dir."""
    if "://" not in path:
        return pafs.LocalFileSystem(use_mmap=True), os.path.abspath(path)
    try:
        return pafs.FileSystem.from_uri(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot open this location ({e})") from None


def _list(path: str, *, recursive: bool = False) -> list[tuple[str, pafs.FileInfo]]:
    """(path as the user writes it, info) of each entry under the directory `path`."""
    fs, inner = _filesystem(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=recursive))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot list ({e})") from None
    base = path.rstrip("/")
    return [(f"{base}/{i.path[len(inner) :].lstrip('/')}", i) for i in infos]


def _read_json(path: str) -> dict:
    fs, inner = _filesystem(path)
    try:
        with fs.open_input_stream(inner) as f:
            return json.loads(f.read())
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def _shard_files(path: str) -> list[str] | None:
    """The shard files a glob or a directory stands for; None when `path` is one file."""
    if any(c in path for c in _GLOB_CHARS):
        files = _glob(path)
        if not files:
            raise DataError(f"{path}: matches no files")
        return files
    fs, inner = _filesystem(path)
    try:
        kind = fs.get_file_info(inner).type
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot open ({e})") from None
    if kind == pafs.FileType.NotFound:
        raise DataError(f"{path}: file not found")
    if kind != pafs.FileType.Directory:
        return None
    entries = {p.rsplit("/", 1)[-1]: (p, i) for p, i in _list(path)}
    if "dataset_dict.json" in entries:
        splits = _read_json(entries["dataset_dict.json"][0]).get("splits", [])
        example = f"{path.rstrip('/')}/{splits[0]}" if splits else f"{path}/SPLIT"
        raise DataError(
            f"{path}: is a datasets DatasetDict (splits: {', '.join(splits)}); give one split's "
            f"directory, e.g. {example}"
        )
    if "state.json" in entries:  # Dataset.save_to_disk
        state = _read_json(entries["state.json"][0])
        names = [f.get("filename") for f in state.get("_data_files", [])]
        if not names or not all(isinstance(n, str) for n in names):
            raise DataError(f"{path}/state.json: lists no data files (_data_files)")
        return [f"{path.rstrip('/')}/{n}" for n in names]
    files = sorted(
        p
        for name, (p, i) in entries.items()
        if i.type == pafs.FileType.File and _is_data_file(name)
    )
    if not files:
        raise DataError(
            f"{path}: is a directory with no data files (*.jsonl, *.parquet, *.arrow, "
            "*.array_record*) and no datasets state.json"
        )
    return files


def _glob(pattern: str) -> list[str]:
    """Files matching `pattern`, each segment after the first wildcard matched by fnmatch."""
    parts = pattern.split("/")
    first = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS))
    base, rest = "/".join(parts[:first]), parts[first:]
    relative = not base and not pattern.startswith("/")  # e.g. "*.parquet"
    base = "." if relative else base or "/"
    fs, inner = _filesystem(base)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        return []
    out = []
    for p, info in _list(base, recursive=len(rest) > 1):
        segments = p[len(base.rstrip("/")) + 1 :].split("/")
        if info.type == pafs.FileType.File and len(segments) == len(rest):
            if all(fnmatch.fnmatchcase(s, r) for s, r in zip(segments, rest, strict=True)):
                out.append(p.removeprefix("./") if relative else p)
    return sorted(out)


def _read_table(path: str, kind: str) -> pa.Table:
    """A Parquet or Arrow IPC (stream or file format) file as one table."""
    fs, inner = _filesystem(path)
    try:
        if kind == "parquet":
            return pq.read_table(inner, filesystem=fs)
        f = fs.open_input_file(inner)
        try:
            return pa.ipc.open_file(f).read_all()
        except pa.ArrowInvalid:  # not the file format: the stream format `datasets` writes
            f.seek(0)
            return pa.ipc.open_stream(f).read_all()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read as {kind} ({e})") from None


def _open_array_record(path: str):
    from grain.sources import ArrayRecordDataSource

    try:
        return ArrayRecordDataSource([path])
    except (RuntimeError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read as ArrayRecord ({e})") from None
