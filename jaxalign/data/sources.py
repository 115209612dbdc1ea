"""JSONL record sources with random access, validation and bad-record accounting.

`JsonlSource` reads a JSONL file line by line once (streaming; only byte offsets are kept in
memory), validates every record with the given parser (after the record-level transforms), and then
serves records by index (``len`` / ``__getitem__``, the Grain random-access source protocol),
re-reading each line from disk on access. Validation up front means a malformed record fails at
startup, not at step 10 000:

  data/pairs.jsonl line 1207: field "rejected" is missing (expected a string or a list of messages)

With ``skip_bad_records=True`` bad lines are skipped instead; `num_bad_records` counts them and
`bad_record_messages` keeps the first few messages for logging. Blank lines are ignored.

Record-level transforms (e.g. `jaxalign.data.transforms.reward_augment`) map one raw record (dict)
to a list of records; they must be deterministic. A record that becomes k records occupies k
indices.
"""

from __future__ import annotations

import array
import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from jaxalign.data.errors import DataError, RecordError

RecordTransform = Callable[[dict], list[dict]]
_KEEP_MESSAGES = 10


class JsonlSource:
    """Random-access view of a JSONL file's valid records, each passed through `parse`.

    Args:
      path: the ``.jsonl`` file.
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
                    try:
                        count = len(self._records(line, line_no))
                    except DataError as e:
                        if not skip_bad_records:
                            raise
                        self.num_bad_records += 1
                        if len(self.bad_record_messages) < _KEEP_MESSAGES:
                            self.bad_record_messages.append(str(e))
                        count = 0
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
            why = (
                f"all {self.num_bad_records} malformed, skipped"
                if self.num_bad_records
                else "empty"
            )
            raise DataError(f"{self.path}: no records ({why})")

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
            recs = [rec]
            for t in self._transforms:
                recs = [out for r in recs for out in t(r)]
            return [self._parse(r) for r in recs]
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
