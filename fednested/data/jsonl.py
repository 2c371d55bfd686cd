"""Reading and writing JSONL record files, with every bad line reported by file and line number.

By default a bad line is skipped, counted and logged, and every valid line is kept; in strict mode the first bad
line raises `JsonlFormatError`. Blank lines are not records and are skipped (and counted) in both modes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fednested.data.records import Record, RecordError, parse_record, record_to_json

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BadLine:
    """A line that is not a valid record: where it is and what is wrong with it."""

    path: str
    line_number: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line_number}: {self.reason}"


class JsonlFormatError(ValueError):
    """Raised in strict mode for the first bad line; the message starts with ``path:line:``."""

    def __init__(self, bad_line: BadLine) -> None:
        self.bad_line = bad_line
        super().__init__(str(bad_line))


@dataclass
class JsonlReadResult:
    """What one read produced: the valid records in file order, and an account of everything skipped."""

    records: list[Record] = field(default_factory=list)
    bad_lines: list[BadLine] = field(default_factory=list)
    blank_lines: int = 0
    lines_read: int = 0

    @property
    def skipped(self) -> int:
        return len(self.bad_lines)

    def extend(self, other: JsonlReadResult) -> None:
        self.records.extend(other.records)
        self.bad_lines.extend(other.bad_lines)
        self.blank_lines += other.blank_lines
        self.lines_read += other.lines_read


def _parse_line(raw: bytes, *, path: str, line_number: int) -> Record | BadLine | None:
    """A record, a `BadLine` explaining why there is none, or None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return BadLine(path, line_number, f"not valid UTF-8 (byte {error.start}: {error.reason})")
    if line_number == 1:
        text = text.removeprefix("\ufeff")  # editors on Windows prepend a byte-order mark
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return BadLine(path, line_number, f"invalid JSON: {error.msg} at column {error.colno}")
    try:
        return parse_record(value)
    except RecordError as error:
        return BadLine(path, line_number, str(error))


def iter_jsonl(path: str | os.PathLike[str], *, strict: bool = False) -> Iterator[Record | BadLine]:
    """Yield each non-blank line of `path` as a record or a `BadLine`, streaming (constant memory).

    In strict mode a bad line raises `JsonlFormatError` instead of being yielded.
    """
    display = os.fspath(path)
    with open(path, "rb") as stream:
        for line_number, raw in enumerate(stream, start=1):
            item = _parse_line(raw.rstrip(b"\r\n"), path=display, line_number=line_number)
            if isinstance(item, BadLine) and strict:
                raise JsonlFormatError(item)
            if item is not None:
                yield item


def read_jsonl(path: str | os.PathLike[str], *, strict: bool = False) -> JsonlReadResult:
    """Read every record of one JSONL file; bad lines are skipped and reported (or raise, when `strict`)."""
    result = JsonlReadResult()
    display = os.fspath(path)
    with open(path, "rb") as stream:
        for line_number, raw in enumerate(stream, start=1):
            result.lines_read += 1
            item = _parse_line(raw.rstrip(b"\r\n"), path=display, line_number=line_number)
            if item is None:
                result.blank_lines += 1
            elif isinstance(item, BadLine):
                if strict:
                    raise JsonlFormatError(item)
                logger.warning("skipping bad record: %s", item)
                result.bad_lines.append(item)
            else:
                result.records.append(item)
    return result


def read_jsonl_files(paths: Sequence[str | os.PathLike[str]], *, strict: bool = False) -> JsonlReadResult:
    """Read several JSONL files in order into one result."""
    combined = JsonlReadResult()
    for path in paths:
        combined.extend(read_jsonl(path, strict=strict))
    return combined


def write_jsonl(path: str | os.PathLike[str], records: Iterable[Record]) -> int:
    """Write `records` one JSON object per line (UTF-8, no ASCII escaping); returns the number written."""
    count = 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as stream:
        for record in records:
            stream.write(json.dumps(record_to_json(record), ensure_ascii=False))
            stream.write("\n")
            count += 1
    return count
