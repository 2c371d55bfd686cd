"""The sidecar's local audit log: an append-only, hash-chained JSONL file that records every outbound decision and
never leaves the device. `verify_chain` finds any edited, deleted, inserted or reordered entry and names its line."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge_client.errors import EdgeClientError

GENESIS_HASH = "0" * 64
_ENTRY_KEYS = ("seq", "time", "action", "details", "prev_hash", "hash")


class AuditChainError(EdgeClientError):
    """The audit log does not verify; `line` is the 1-based line where the chain first breaks (None: the file)."""

    def __init__(self, path: Path, line: int | None, problem: str) -> None:
        self.path = path
        self.line = line
        self.problem = problem
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"audit log {where}: {problem}")


@dataclass(frozen=True)
class AuditEntry:
    """One chained record. `hash` is sha256 over the canonical JSON of every other field."""

    seq: int
    time: str
    action: str
    details: dict[str, Any]
    prev_hash: str
    hash: str

    def to_line(self) -> bytes:
        return canonical_json({key: getattr(self, key) for key in _ENTRY_KEYS}) + b"\n"


@dataclass(frozen=True)
class ChainReport:
    """What `verify_chain` found: how many entries and the hash at the head of the chain."""

    path: Path
    entries: int
    head_seq: int
    head_hash: str


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, no NaN: one byte string per value, so hashes are reproducible."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def entry_hash(seq: int, time: str, action: str, details: dict[str, Any], prev_hash: str) -> str:
    body = {"seq": seq, "time": time, "action": action, "details": details, "prev_hash": prev_hash}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def head_path_for(path: Path) -> Path:
    """The head anchor beside the log: the last (seq, hash) written, so deleting trailing entries is detected."""
    return path.with_name(path.name + ".head")


def _parse_line(path: Path, line_number: int, raw: bytes) -> AuditEntry:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AuditChainError(path, line_number, f"not a JSON entry ({exc})") from None
    if not isinstance(data, dict) or sorted(data) != sorted(_ENTRY_KEYS):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise AuditChainError(path, line_number, f"expected exactly the keys {list(_ENTRY_KEYS)}, found {found}")
    seq, time, action, details = data["seq"], data["time"], data["action"], data["details"]
    prev_hash, stored_hash = data["prev_hash"], data["hash"]
    if not (isinstance(seq, int) and isinstance(time, str) and isinstance(action, str) and isinstance(details, dict)):
        raise AuditChainError(path, line_number, "seq must be an integer, time and action strings, details an object")
    if not (isinstance(prev_hash, str) and isinstance(stored_hash, str)):
        raise AuditChainError(path, line_number, "prev_hash and hash must be strings")
    return AuditEntry(seq, time, action, details, prev_hash, stored_hash)


def _read_head(path: Path) -> tuple[int, str] | None:
    head_file = head_path_for(path)
    try:
        data = json.loads(head_file.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise AuditChainError(head_file, None, f"unreadable head anchor ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("seq"), int) or not isinstance(data.get("hash"), str):
        raise AuditChainError(head_file, None, "head anchor must be {'seq': int, 'hash': str}")
    return data["seq"], data["hash"]


def _verify_lines(path: Path, lines: list[bytes]) -> tuple[int, str]:
    """Walk the chain; return (last seq, last hash). Each check says which line broke and how."""
    expected_prev, expected_seq = GENESIS_HASH, 1
    for line_number, raw in enumerate(lines, start=1):
        entry = _parse_line(path, line_number, raw)
        if entry.seq != expected_seq:
            problem = (
                f"seq {entry.seq} where {expected_seq} was expected "
                f"({'an entry before it was deleted' if entry.seq > expected_seq else 'entries reordered or repeated'})"
            )
            raise AuditChainError(path, line_number, problem)
        if entry.prev_hash != expected_prev:
            raise AuditChainError(path, line_number, "prev_hash does not match the previous entry's hash")
        recomputed = entry_hash(entry.seq, entry.time, entry.action, entry.details, entry.prev_hash)
        if recomputed != entry.hash:
            raise AuditChainError(path, line_number, "entry was modified after it was written (hash mismatch)")
        expected_prev, expected_seq = entry.hash, expected_seq + 1
    return expected_seq - 1, expected_prev


def _split_lines(path: Path, data: bytes, *, allow_torn_tail: bool) -> tuple[list[bytes], bytes]:
    if not data:
        return [], b""
    complete, _, tail = data.rpartition(b"\n")
    if complete == b"" and not data.startswith(b"\n"):
        complete_lines: list[bytes] = []
        tail = data
    else:
        complete_lines = complete.split(b"\n")
    for index, raw in enumerate(complete_lines, start=1):
        if not raw.strip():
            raise AuditChainError(path, index, "empty line inside the chain")
    if tail and not allow_torn_tail:
        raise AuditChainError(path, len(complete_lines) + 1, "incomplete last entry (the writer was interrupted)")
    return complete_lines, tail


def verify_chain(path: str | Path) -> ChainReport:
    """Verify every entry and the head anchor. Raises AuditChainError naming the first line that does not fit."""
    log_path = Path(path)
    try:
        data = log_path.read_bytes()
    except FileNotFoundError:
        raise AuditChainError(log_path, None, "file not found") from None
    lines, _ = _split_lines(log_path, data, allow_torn_tail=False)
    last_seq, last_hash = _verify_lines(log_path, lines)
    _check_head(log_path, lines, last_seq)
    return ChainReport(path=log_path, entries=len(lines), head_seq=last_seq, head_hash=last_hash)


def _check_head(path: Path, lines: list[bytes], last_seq: int) -> None:
    """The chain alone cannot show that its last entries were cut off; the head anchor can."""
    head = _read_head(path)
    if head is None:
        return
    head_seq, head_hash = head
    if head_seq > last_seq:
        raise AuditChainError(
            path,
            last_seq + 1,
            f"entries {last_seq + 1}..{head_seq} were deleted from the end (the head anchor records seq {head_seq})",
        )
    if head_seq >= 1 and _parse_line(path, head_seq, lines[head_seq - 1]).hash != head_hash:
        raise AuditChainError(path, head_seq, "entry differs from the one the head anchor recorded")


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _write_head(path: Path, seq: int, digest: str) -> None:
    head_file = head_path_for(path)
    tmp = head_file.with_name(head_file.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, canonical_json({"seq": seq, "hash": digest}))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, head_file)


class AuditLog:
    """Appends chained entries to one JSONL file. Opening verifies the existing chain, so a client never extends a
    tampered log; a torn last line left by a crash is cut off and the cut itself is recorded as an entry.
    One writer per file: the edge client holds its state-directory lock while it runs."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)
        data = self.path.read_bytes()
        lines, torn_tail = _split_lines(self.path, data, allow_torn_tail=True)
        self._seq, self._hash = _verify_lines(self.path, lines)
        # The head is written only after a whole line is on disk, so a torn tail never explains a head that is ahead.
        _check_head(self.path, lines, self._seq)
        if torn_tail:
            os.truncate(self.path, len(data) - len(torn_tail))
            self.append(
                "audit.torn_tail_discarded",
                {"bytes": len(torn_tail), "sha256": hashlib.sha256(torn_tail).hexdigest()},
            )

    @property
    def head(self) -> tuple[int, str]:
        return self._seq, self._hash

    def append(self, action: str, details: dict[str, Any]) -> AuditEntry:
        seq, time = self._seq + 1, _utc_now()
        digest = entry_hash(seq, time, action, details, self._hash)
        entry = AuditEntry(seq, time, action, details, self._hash, digest)
        # One write of the whole line on an O_APPEND descriptor, then fsync: the entry is on disk before the
        # action it records (e.g. an upload) is allowed to happen.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, entry.to_line())
            os.fsync(fd)
        finally:
            os.close(fd)
        _write_head(self.path, seq, digest)
        self._seq, self._hash = seq, digest
        return entry
