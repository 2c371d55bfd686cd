"""The tamper-evident audit trail: every AuditEvent is sealed into a sha256 hash chain, and the chain's head is
anchored outside the database.

Why sealing happens after commit, not in the writer's transaction: a chain needs one total order, and taking a
chain lock inside every audited transaction would serialise them all until commit (and deadlock against services
that lock other rows after auditing). Instead the writer inserts its events unsealed and, once its transaction has
committed, the sealer — one at a time, under a PostgreSQL advisory lock — gives the pending events the next places in
the chain in id order. An event therefore joins the chain milliseconds after it is committed; until then it is
reported as unsealed by `verify_chain`. A writer whose sealing fails (the database went away between commit and
seal) leaves its events for the next seal: `fednested audit seal`, or any later audited transaction.

What each link commits to (`canonical_event`): its place (`seq`), the previous link's hash, the event's id, the actor
as named in the trail (`actor_label`: kept when a user row is deleted, unlike the actor foreign key, which is not
hashed for that reason) and its kind (`actor_kind`: person, device, automation or anonymous), the action (`verb`),
the object, the payload and the time. Editing any of them, deleting an event, or moving events around breaks the
chain at that link; `verify_chain` names the first broken link.

An attacker with write access to the database could rewrite the whole chain after the event they changed. The
anchors catch that: `anchor_chain` appends the chain head (seq and hash) to a file outside the database
(FEDNESTED_AUDIT_ANCHOR_FILE), at most every FEDNESTED_AUDIT_ANCHOR_INTERVAL seconds when sealing; `verify_chain`
checks every anchor against the chain, so a rewritten or truncated chain no longer matches what was written down.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from apps.governance.models import AuditEvent

logger = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
# pg_advisory_xact_lock key of the sealer: any fixed 64-bit number no other part of the project uses.
SEAL_LOCK_KEY = 0x6665646E65737464  # "fednestd"
SEAL_BATCH = 1000
_ANCHOR_TAIL_BYTES = 4096


def canonical_event(event: AuditEvent, *, seq: int, prev_hash: str) -> bytes:
    """The bytes an event's link hashes: sorted-key compact JSON of its place, the previous hash and its fields."""
    created = event.created_at.astimezone(UTC).isoformat(timespec="microseconds")
    body = {
        "seq": seq,
        "prev": prev_hash,
        "id": event.pk,
        "actor": event.actor_label,
        "action": event.verb,
        "object_type": event.object_type,
        "object_id": event.object_id,
        "payload": event.data,
        "at": created,
    }
    if event.actor_kind:
        # Only when set, so that events sealed before the column existed keep their hashes.
        body["actor_kind"] = event.actor_kind
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def link_hash(event: AuditEvent, *, seq: int, prev_hash: str) -> str:
    return hashlib.sha256(canonical_event(event, seq=seq, prev_hash=prev_hash)).hexdigest()


def _lock_sealer() -> None:
    # SQLite serialises writers on its own (the demo's embedded database); PostgreSQL needs the advisory lock.
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [SEAL_LOCK_KEY])


def _head() -> tuple[int, str]:
    last = AuditEvent.objects.filter(seq__isnull=False).order_by("-seq").values_list("seq", "entry_hash").first()
    if last is None or last[0] is None:
        return 0, GENESIS_HASH
    return int(last[0]), str(last[1])


def seal_pending() -> int:
    """Seal every committed unsealed event into the chain, in id order; returns how many were sealed.

    Events re-read from the database are hashed (not the writer's in-memory objects), so the hash is of exactly what
    is stored: JSON payloads as the database returns them, timestamps at its precision.
    """
    sealed = 0
    # The common case after the first of several events of one transaction has sealed them all: nothing pending, one
    # indexed query (the partial index on unsealed ids) and no lock.
    if not AuditEvent.objects.filter(seq__isnull=True).exists():
        return 0
    while True:
        with transaction.atomic():
            _lock_sealer()
            seq, prev = _head()
            pending = list(AuditEvent.objects.filter(seq__isnull=True).order_by("id")[:SEAL_BATCH])
            for event in pending:
                seq += 1
                event.seq, event.prev_hash = seq, prev
                event.entry_hash = prev = link_hash(event, seq=seq, prev_hash=prev)
            if pending:
                AuditEvent.objects.bulk_update(pending, ["seq", "prev_hash", "entry_hash"])
        sealed += len(pending)
        if len(pending) < SEAL_BATCH:
            break
    if sealed:
        _anchor_if_due()
    return sealed


def _seal_after_commit() -> None:
    try:
        seal_pending()
    except Exception:  # never let sealing fail the request that already committed; the next seal picks these up
        logger.exception("sealing the audit chain failed; the events stay unsealed until the next seal")


def schedule_seal() -> None:
    """Seal once the current transaction commits (at once outside one). A transaction that records several events
    schedules several seals: the first seals them all and the others find nothing pending (one indexed query each).
    Deduplicating instead would have to follow savepoints (a callback of a rolled-back savepoint is dropped)."""
    transaction.on_commit(_seal_after_commit)


# ---- anchors --------------------------------------------------------------------------------------------------


def anchor_file() -> Path:
    return Path(settings.FEDNESTED_AUDIT_ANCHOR_FILE)


@dataclass(frozen=True)
class Anchor:
    """The chain head written down outside the database: line `line` of the anchor file."""

    seq: int
    hash: str
    at: str
    line: int


class AnchorFileError(ValueError):
    """The anchor file cannot be read as anchors (a line that is not an anchor); names the file and the line."""


def read_anchors(path: Path | None = None) -> list[Anchor]:
    path = path or anchor_file()
    if not path.exists():
        return []
    anchors = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                anchors.append(Anchor(int(data["seq"]), str(data["hash"]), str(data["at"]), number))
            except (ValueError, KeyError, TypeError) as error:
                raise AnchorFileError(f"{path}, line {number}: not an anchor ({error})") from error
    return anchors


def _last_anchor_time(path: Path) -> float | None:
    if not path.exists():
        return None
    with path.open("rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(max(0, size - _ANCHOR_TAIL_BYTES))
        tail = handle.read().decode("utf-8", errors="replace").strip().splitlines()
    try:
        return datetime.fromisoformat(json.loads(tail[-1])["at"]).timestamp() if tail else None
    except (ValueError, KeyError, TypeError, IndexError):
        return None  # a damaged last line: anchor again now (verify reports the damage)


def anchor_chain(path: Path | None = None) -> Anchor | None:
    """Append the chain head to the anchor file (fsynced); None when nothing is sealed yet."""
    path = path or anchor_file()
    seq, head = _head()
    if seq == 0:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    at = datetime.now(UTC).isoformat(timespec="seconds")
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"seq": seq, "hash": head, "at": at}, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return Anchor(seq, head, at, 0)


def _anchor_if_due() -> None:
    interval = float(settings.FEDNESTED_AUDIT_ANCHOR_INTERVAL)
    if interval <= 0:
        return
    last = _last_anchor_time(anchor_file())
    if last is None or time.time() - last >= interval:
        anchor_chain()


# ---- verification ---------------------------------------------------------------------------------------------


@dataclass
class ChainReport:
    """What `verify_chain` found: `broken` names the first broken link (None when the chain holds)."""

    events: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS_HASH
    unsealed: int = 0
    anchors_checked: int = 0
    broken: str | None = None
    broken_seq: int | None = None
    broken_event_id: int | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.broken is None

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events": self.events,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash,
            "unsealed": self.unsealed,
            "anchors_checked": self.anchors_checked,
            "broken": self.broken,
            "broken_seq": self.broken_seq,
            "broken_event_id": self.broken_event_id,
            "warnings": self.warnings,
        }


def _sealed_in_order() -> Iterator[AuditEvent]:
    return AuditEvent.objects.filter(seq__isnull=False).order_by("seq").iterator(chunk_size=2000)


def verify_chain(anchors: Path | None = None) -> ChainReport:
    """Walk the whole chain from its first link, recomputing every hash; then check every anchor against it."""
    report = ChainReport()
    hashes_at: dict[int, str] = {}
    wanted = {anchor.seq for anchor in read_anchors(anchors)}
    expected_seq, prev = 1, GENESIS_HASH
    for event in _sealed_in_order():
        seq = int(event.seq or 0)
        if seq != expected_seq:
            report.broken = (
                f"event seq {expected_seq} is missing (the chain jumps from {expected_seq - 1} to {seq}): "
                f"{seq - expected_seq} event(s) deleted"
            )
            report.broken_seq, report.broken_event_id = expected_seq, event.pk
            break
        if event.prev_hash != prev:
            report.broken = (
                f"event seq {seq} (id {event.pk}) names {event.prev_hash[:12]}… as the previous hash, but event seq "
                f"{seq - 1} hashes to {prev[:12]}…: events were moved or replaced"
            )
            report.broken_seq, report.broken_event_id = seq, event.pk
            break
        recomputed = link_hash(event, seq=seq, prev_hash=prev)
        if recomputed != event.entry_hash:
            report.broken = (
                f"event seq {seq} (id {event.pk}, {event.verb}) does not match its hash: its actor, action, object, "
                "payload, time or place was changed after it was sealed"
            )
            report.broken_seq, report.broken_event_id = seq, event.pk
            break
        if seq in wanted:
            hashes_at[seq] = recomputed
        prev = recomputed
        report.events += 1
        report.head_seq, report.head_hash = seq, recomputed
        expected_seq += 1
    report.unsealed = AuditEvent.objects.filter(seq__isnull=True).count()
    if report.unsealed:
        report.warnings.append(f"{report.unsealed} event(s) not sealed yet (run `fednested audit seal`)")
    if report.broken is None:
        _check_anchors(report, read_anchors(anchors), hashes_at)
    return report


def _check_anchors(report: ChainReport, anchors: list[Anchor], hashes_at: dict[int, str]) -> None:
    for anchor in anchors:
        report.anchors_checked += 1
        if anchor.seq > report.head_seq:
            report.broken = (
                f"the anchor of {anchor.at} (line {anchor.line}) names seq {anchor.seq}, but the chain ends at seq "
                f"{report.head_seq}: events were deleted from the end of the trail"
            )
            report.broken_seq = report.head_seq + 1
            return
        if hashes_at.get(anchor.seq) != anchor.hash:
            report.broken = (
                f"the anchor of {anchor.at} (line {anchor.line}) names {anchor.hash[:12]}… at seq {anchor.seq}, but "
                f"the chain there hashes to {hashes_at.get(anchor.seq, '?')[:12]}…: the chain was rewritten"
            )
            report.broken_seq = anchor.seq
            return
