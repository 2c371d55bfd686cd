"""Exports of the audit trail (CSV and JSON Lines) and the offline check of a JSON Lines export.

An export carries each event's place in the hash chain (`seq`, `prev_hash`, `entry_hash`) beside its fields, in the
form the chain hashes them, so whoever receives it can check it without the database: every sealed event's hash is
recomputed from the line itself, and consecutive events must link. A filtered export is a set of stretches of the
chain; each stretch links internally, and every line verifies on its own.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.db.models import QuerySet
from django.http import StreamingHttpResponse

from apps.governance.actors import ActorLike
from apps.governance.audit import record_audit_event
from apps.governance.chain import link_hash
from apps.governance.models import AuditEvent

EXPORT_FIELDS = (
    "seq",
    "id",
    "created_at",
    "actor_label",
    "verb",
    "object_type",
    "object_id",
    "data",
    "prev_hash",
    "entry_hash",
    # Last, so that the columns of exports made before it existed keep their places.
    "actor_kind",
)
JSONL_MEDIA_TYPE = "application/x-ndjson"
CSV_MEDIA_TYPE = "text/csv"
# A line of an export longer than this is not one of ours (a payload is small JSON); refused before parsing.
MAX_LINE_BYTES = 1 << 20


def audit_export_response(
    events: QuerySet[AuditEvent], *, kind: str, actor: ActorLike, filters: dict[str, str]
) -> StreamingHttpResponse:
    """A streamed download of `events` as `kind` ("jsonl" or "csv"); the export itself is audited (who took which
    part of the trail), before the first byte goes out."""
    record_audit_event(actor=actor, verb="governance.audit.exported", data={"format": kind, "filters": filters})
    lines = jsonl_lines(events) if kind == "jsonl" else csv_lines(events)
    response = StreamingHttpResponse(lines, content_type=JSONL_MEDIA_TYPE if kind == "jsonl" else CSV_MEDIA_TYPE)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    response["Content-Disposition"] = f'attachment; filename="audit-{stamp}.{kind}"'
    return response


def export_order(events: QuerySet[AuditEvent]) -> QuerySet[AuditEvent]:
    """Chain order: sealed events by `seq`, then any not sealed yet by id."""
    return events.order_by("seq", "id")


def event_record(event: AuditEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "id": event.pk,
        "created_at": event.created_at.astimezone(UTC).isoformat(timespec="microseconds"),
        "actor_label": event.actor_label,
        "actor_kind": event.actor_kind,
        "verb": event.verb,
        "object_type": event.object_type,
        "object_id": event.object_id,
        "data": event.data,
        "prev_hash": event.prev_hash,
        "entry_hash": event.entry_hash,
    }


def jsonl_lines(events: QuerySet[AuditEvent]) -> Iterator[str]:
    for event in export_order(events).iterator(chunk_size=2000):
        yield json.dumps(event_record(event), ensure_ascii=False, sort_keys=True) + "\n"


def csv_lines(events: QuerySet[AuditEvent]) -> Iterator[str]:
    """CSV with a header; `data` as compact JSON text (a spreadsheet cannot hold nested values)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def flush() -> str:
        text = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return text

    writer.writerow(EXPORT_FIELDS)
    yield flush()
    for event in export_order(events).iterator(chunk_size=2000):
        record = event_record(event)
        record["data"] = json.dumps(record["data"], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        # A cell starting with = + - @ is a formula to a spreadsheet: audit text comes from users and devices.
        writer.writerow([_inert(record[name]) for name in EXPORT_FIELDS])
        yield flush()


def _inert(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


@dataclass
class ExportReport:
    """What `verify_export` found; `problems` lists each line that does not verify (line number and why)."""

    lines: int = 0
    verified: int = 0
    unsealed: int = 0
    stretches: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "lines": self.lines,
            "verified": self.verified,
            "unsealed": self.unsealed,
            "stretches": self.stretches,
            "problems": self.problems,
        }


def _event_from(record: dict[str, Any]) -> AuditEvent:
    return AuditEvent(
        pk=int(record["id"]),
        actor_label=str(record["actor_label"]),
        # Exports made before the column existed lack it; their events' hashes do not cover it either.
        actor_kind=str(record.get("actor_kind") or ""),
        verb=str(record["verb"]),
        object_type=str(record["object_type"]),
        object_id=str(record["object_id"]),
        data=record["data"],
        created_at=datetime.fromisoformat(str(record["created_at"])),
    )


def verify_export(lines: Iterable[str | bytes], *, source: str = "the export") -> ExportReport:
    """Check a JSON Lines export line by line: each sealed event against its own hash, consecutive ones linked."""
    report = ExportReport()
    previous: tuple[int, str] | None = None
    for number, raw in enumerate(lines, start=1):
        if len(raw) > MAX_LINE_BYTES:
            report.lines += 1
            report.problems.append(f"{source}, line {number}: longer than {MAX_LINE_BYTES} bytes")
            previous = None
            continue
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        if not text.strip():
            continue
        report.lines += 1
        try:
            record = json.loads(text)
            if not isinstance(record, dict):
                raise TypeError("not a JSON object")
            missing = [name for name in EXPORT_FIELDS if name not in record and name != "actor_kind"]
            if missing:
                raise KeyError(f"missing {', '.join(missing)}")
            if record["seq"] is None:
                report.unsealed += 1
                previous = None
                continue
            seq = int(record["seq"])
            event = _event_from(record)
            recomputed = link_hash(event, seq=seq, prev_hash=str(record["prev_hash"]))
        except (ValueError, TypeError, KeyError) as error:
            report.problems.append(f"{source}, line {number}: not an audit event ({error})")
            previous = None
            continue
        if recomputed != record["entry_hash"]:
            report.problems.append(
                f"{source}, line {number}: event seq {seq} (id {record['id']}) does not match its hash: changed "
                "after it was sealed or after it was exported"
            )
        elif previous is not None and previous[0] + 1 == seq and previous[1] != record["prev_hash"]:
            report.problems.append(
                f"{source}, line {number}: event seq {seq} does not follow event seq {previous[0]} of line "
                f"{number - 1}: the chain is broken between them"
            )
        else:
            report.verified += 1
        if previous is None or previous[0] + 1 != seq:
            report.stretches += 1
        previous = (seq, str(record["entry_hash"]))
    return report
