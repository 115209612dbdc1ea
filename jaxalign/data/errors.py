"""Errors raised on bad input data.

Every message names the file, the line, the field and what was expected, e.g.

  data/pairs.jsonl line 1207: field "rejected" is missing (expected a string or a list of messages)
"""

from __future__ import annotations

from jaxalign.errors import DataError

__all__ = ["DataError", "RecordError"]


class RecordError(ValueError):
    """A problem with one record, before the file and line are known.

    Raised by the record parsers in `jaxalign.data.formats`; `jaxalign.data.sources` catches it and
    re-raises a `DataError` that adds the file name and line number.
    """

    def __init__(self, field: str, problem: str, expected: str):
        self.field = field
        self.problem = problem
        self.expected = expected
        super().__init__(f'field "{field}" {problem} (expected {expected})')
