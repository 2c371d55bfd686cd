"""The local audit log: entries chain by sha256, and verify_chain names the line of any edit, deletion, insertion,
reordering or truncation."""

import itertools
import json
from pathlib import Path

import pytest

from edge_client.sidecar.audit import (
    GENESIS_HASH,
    AuditChainError,
    AuditLog,
    canonical_json,
    entry_hash,
    head_path_for,
    verify_chain,
)


def _write_log(path: Path, count: int) -> AuditLog:
    log = AuditLog(path)
    for index in range(count):
        log.append("outbound.allowed", {"index": index, "bytes": 100 * index, "tensor_names": [f"t{index}"]})
    return log


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_entries_chain_from_genesis_and_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = _write_log(path, 5)
    entries = [json.loads(line) for line in _lines(path)]
    assert [entry["seq"] for entry in entries] == [1, 2, 3, 4, 5]
    assert entries[0]["prev_hash"] == GENESIS_HASH
    for previous, entry in itertools.pairwise(entries):
        assert entry["prev_hash"] == previous["hash"]
    for entry in entries:
        body = {key: entry[key] for key in ("seq", "time", "action", "details", "prev_hash")}
        assert entry["hash"] == entry_hash(**body)
    report = verify_chain(path)
    assert (report.entries, report.head_seq, report.head_hash) == (5, 5, entries[-1]["hash"])
    assert log.head == (5, entries[-1]["hash"])
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, 2)
    AuditLog(path).append("device.enrolled", {"client_id": "edge-1"})
    assert verify_chain(path).entries == 3


def test_edited_entry_is_detected_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, 4)
    lines = _lines(path)
    entry = json.loads(lines[2])
    entry["details"]["bytes"] = 1  # someone lowers the recorded size
    lines[2] = canonical_json(entry) + b"\n"
    path.write_bytes(b"".join(lines))
    with pytest.raises(AuditChainError) as caught:
        verify_chain(path)
    assert caught.value.line == 3
    assert "modified" in str(caught.value)
    assert f"{path}:3" in str(caught.value)


def test_edit_with_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, 4)
    lines = _lines(path)
    entry = json.loads(lines[1])
    entry["action"] = "outbound.refused"
    entry["hash"] = entry_hash(entry["seq"], entry["time"], entry["action"], entry["details"], entry["prev_hash"])
    lines[1] = canonical_json(entry) + b"\n"
    path.write_bytes(b"".join(lines))
    with pytest.raises(AuditChainError) as caught:
        verify_chain(path)
    assert caught.value.line == 3
    assert "prev_hash" in caught.value.problem


def test_deleted_middle_entry_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, 5)
    lines = _lines(path)
    del lines[2]
    path.write_bytes(b"".join(lines))
    with pytest.raises(AuditChainError) as caught:
        verify_chain(path)
    assert caught.value.line == 3
    assert "deleted" in caught.value.problem


def test_reordered_entries_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, 5)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_bytes(b"".join(lines))
    with pytest.raises(AuditChainError) as caught:
        verify_chain(path)
    assert caught.value.line == 2


def test_deleted_last_entries_are_detected_through_the_head_anchor(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, 5)
    path.write_bytes(b"".join(_lines(path)[:3]))
    with pytest.raises(AuditChainError) as caught:
        verify_chain(path)
    assert caught.value.line == 4
    assert "4..5 were deleted" in caught.value.problem
    # A client never extends a log it cannot verify.
    with pytest.raises(AuditChainError):
        AuditLog(path)


def test_replaced_log_with_a_valid_but_different_chain_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, 3)
    head = head_path_for(path).read_bytes()
    path.unlink()
    head_path_for(path).unlink()
    _write_log(path, 3)  # a fresh, internally valid chain (different times, so different hashes)
    head_path_for(path).write_bytes(head)
    with pytest.raises(AuditChainError) as caught:
        verify_chain(path)
    assert caught.value.line == 3


def test_garbage_and_torn_lines_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, 2)
    lines = _lines(path)
    path.write_bytes(lines[0] + b"not json\n" + lines[1])
    with pytest.raises(AuditChainError) as caught:
        verify_chain(path)
    assert caught.value.line == 2
    assert "not a JSON entry" in caught.value.problem

    torn = tmp_path / "torn.jsonl"
    _write_log(torn, 2)
    with open(torn, "ab") as handle:
        handle.write(b'{"seq": 3, "ti')
    with pytest.raises(AuditChainError) as caught:
        verify_chain(torn)
    assert caught.value.line == 3
    assert "interrupted" in caught.value.problem


def test_torn_tail_from_a_crash_is_cut_and_the_cut_is_recorded(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, 2)
    fragment = b'{"seq":3,"action":"outbound.allow'
    with open(path, "ab") as handle:
        handle.write(fragment)
    log = AuditLog(path)
    report = verify_chain(path)
    assert report.entries == 3
    last = json.loads(_lines(path)[-1])
    assert last["action"] == "audit.torn_tail_discarded"
    assert last["details"]["bytes"] == len(fragment)
    assert log.head[0] == 3


def test_missing_log_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(AuditChainError, match="file not found"):
        verify_chain(tmp_path / "nope.jsonl")
