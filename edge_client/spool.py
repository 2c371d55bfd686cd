"""The outbox: every update and telemetry event is written to disk atomically before anything is sent, and moved
to done/ only after the bus acknowledged it, so a client that is killed or offline resumes without losing an update
or minting a second id for it. Sending = upload payload (idempotent PUT) → sign envelope → publish → mark done."""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from edge_client.errors import EdgeClientError
from edge_client.sidecar import OutboundRefused
from edge_client.sidecar.audit import canonical_json
from edge_client.state import atomic_write_bytes, fsync_dir
from edge_client.transport.bus import EventPublisher
from edge_client.transport.http import ControlPlaneClient, ControlPlaneRejected, ControlPlaneUnavailable
from edge_client.transport.retry import RetriesExhausted, RetryPolicy, call_with_retries
from fednested.messaging.bus import BusError
from fednested.messaging.schemas import Telemetry, TelemetryV2, UpdateEnvelope, decode
from fednested.messaging.topics import Topic
from fednested.observability.tracing import tracer

ITEM_FILE = "item.json"
RECEIPT_FILE = "receipt.json"
FAILURE_FILE = "failure.json"
KIND_UPDATE = "update"
KIND_TELEMETRY = "telemetry"


class SpoolError(EdgeClientError):
    """The spool directory holds something unexpected (a duplicate id, an unreadable item)."""


@dataclass(frozen=True)
class SpoolItem:
    """One queued send. For an update, `event` is the envelope without `payload` and `signature`: those are
    filled in from the upload receipt and the device credential at send time, the same way on every retry."""

    item_id: str
    kind: str
    topic: Topic
    key: str
    event: dict[str, Any]
    directory: Path
    payload_file: Path | None

    @property
    def receipt_file(self) -> Path:
        return self.directory / RECEIPT_FILE


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(Path(directory) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(directory))


class Outbox:
    """pending/ (FIFO by creation time), done/ (sent; payload removed), failed/ (refused for good, kept with the
    reason for the operator), tmp/ (items being written; never read)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        for sub in ("tmp", "pending", "done", "failed"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        # Leftovers of an add() interrupted before its rename were never queued; nothing refers to them.
        for leftover in (self.root / "tmp").iterdir():
            shutil.rmtree(leftover, ignore_errors=True)

    def _existing(self, item_id: str) -> Path | None:
        for sub in ("pending", "done", "failed"):
            for entry in (self.root / sub).glob(f"*-{item_id}"):
                return entry
        return None

    def add(
        self,
        item_id: str,
        kind: str,
        topic: Topic,
        key: str,
        event: dict[str, Any],
        *,
        write_payload: Callable[[Path], Path] | None = None,
    ) -> SpoolItem:
        """Queue one item: build it under tmp/, fsync every file, then rename it into pending/ in one step.
        `write_payload(dir)` writes the payload file inside `dir` and returns its path."""
        existing = self._existing(item_id)
        if existing is not None:
            raise SpoolError(f"spool item {item_id} already exists at {existing}; an id is never queued twice")
        name = f"{time.time_ns():020d}-{item_id}"
        staging = self.root / "tmp" / name
        staging.mkdir(mode=0o700)
        payload_name: str | None = None
        if write_payload is not None:
            try:
                payload_path = write_payload(staging)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            payload_name = str(payload_path.relative_to(staging))
        record = {
            "item_id": item_id,
            "kind": kind,
            "topic": topic.value,
            "key": key,
            "event": event,
            "payload_file": payload_name,
            "queued_at": datetime.now(UTC).isoformat(),
        }
        (staging / ITEM_FILE).write_bytes(canonical_json(record))
        _fsync_tree(staging)
        final = self.root / "pending" / name
        os.rename(staging, final)
        fsync_dir(final.parent)
        fsync_dir(staging.parent)
        return self._load(final)

    def _load(self, directory: Path) -> SpoolItem:
        try:
            record = json.loads((directory / ITEM_FILE).read_bytes())
            payload_name = record["payload_file"]
            return SpoolItem(
                item_id=record["item_id"],
                kind=record["kind"],
                topic=Topic(record["topic"]),
                key=record["key"],
                event=record["event"],
                directory=directory,
                payload_file=directory / payload_name if payload_name else None,
            )
        except (OSError, ValueError, KeyError) as exc:
            raise SpoolError(f"spool item {directory / ITEM_FILE} is unreadable ({exc}); move it aside") from exc

    def pending(self) -> list[SpoolItem]:
        return [self._load(entry) for entry in sorted((self.root / "pending").iterdir())]

    def ids(self, sub: str) -> list[str]:
        return [entry.name.split("-", 1)[1] for entry in sorted((self.root / sub).iterdir())]

    def _records(self, subs: tuple[str, ...]) -> list[dict[str, Any]]:
        records = []
        for sub in subs:
            for entry in sorted((self.root / sub).iterdir()):
                try:
                    records.append(json.loads((entry / ITEM_FILE).read_bytes()))
                except (OSError, ValueError) as exc:
                    raise SpoolError(f"spool item {entry / ITEM_FILE} is unreadable ({exc}); move it aside") from exc
        return records

    def base_versions(self) -> set[str]:
        """Base versions an update was ever queued for (pending, sent or failed): the client trains once on each."""
        return {
            str(record["event"].get("base_version"))
            for record in self._records(("pending", "done", "failed"))
            if record.get("kind") == KIND_UPDATE
        }

    def kinds(self) -> dict[str, str]:
        """item id → kind for every item ever queued."""
        return {str(r["item_id"]): str(r["kind"]) for r in self._records(("pending", "done", "failed"))}

    def record_receipt(self, item: SpoolItem, receipt: dict[str, Any]) -> None:
        atomic_write_bytes(item.receipt_file, canonical_json(receipt))

    def receipt(self, item: SpoolItem) -> dict[str, Any] | None:
        try:
            data = json.loads(item.receipt_file.read_bytes())
        except FileNotFoundError:
            return None
        if not isinstance(data, dict):
            raise SpoolError(f"receipt {item.receipt_file} is not a JSON object")
        return data

    def _move(self, item: SpoolItem, sub: str) -> Path:
        target = self.root / sub / item.directory.name
        os.rename(item.directory, target)
        fsync_dir(target.parent)
        fsync_dir(item.directory.parent)
        return target

    def mark_done(self, item: SpoolItem) -> None:
        target = self._move(item, "done")
        if item.payload_file is not None:
            (target / item.payload_file.relative_to(item.directory)).unlink(missing_ok=True)

    def mark_failed(self, item: SpoolItem, reason: str) -> None:
        atomic_write_bytes(item.directory / FAILURE_FILE, canonical_json({"reason": reason}))
        self._move(item, "failed")


@dataclass
class DeliveryReport:
    delivered: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    pending: int = 0
    last_error: str | None = None


def finalize_envelope(
    item: SpoolItem, receipt: dict[str, Any], signing_key: ec.EllipticCurvePrivateKey
) -> UpdateEnvelope:
    """The envelope as published: the spooled fields plus the payload reference from the receipt, signed. Same
    inputs give the same bytes, so a resend after a crash is the identical envelope."""
    fields = dict(item.event)
    fields["payload"] = {"uri": receipt["uri"], "sha256": receipt["sha256"], "size_bytes": receipt["bytes"]}
    envelope = UpdateEnvelope.model_validate_json(canonical_json(fields))
    return envelope.signed(signing_key)


@dataclass
class Deliverer:
    """Sends the outbox in order. Transient failures (no network, 5xx, bus down) are retried with backoff; an
    item the control plane or the sidecar refuses for good goes to failed/ with the reason; nothing is dropped."""

    outbox: Outbox
    api: ControlPlaneClient
    publisher: EventPublisher
    signing_key: ec.EllipticCurvePrivateKey
    retry: RetryPolicy
    rng: random.Random = field(default_factory=random.Random)
    sleep: Callable[[float], None] = time.sleep
    on_event: Callable[[str, dict[str, Any]], None] | None = None

    def _note(self, action: str, details: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(action, details)

    def send(self, item: SpoolItem) -> None:
        """One attempt at the whole sequence for one item; each step is skipped when a previous attempt did it."""
        if item.kind == KIND_UPDATE:
            receipt = self.outbox.receipt(item)
            if receipt is None:
                if item.payload_file is None:
                    raise SpoolError(f"update {item.item_id} in {item.directory} has no payload file")
                body = item.payload_file.read_bytes()
                stored = self.api.upload_payload(item.item_id, body, body_source=item.payload_file)
                receipt = {"uri": stored.uri, "sha256": stored.sha256, "bytes": stored.bytes}
                self.outbox.record_receipt(item, receipt)
            envelope = finalize_envelope(item, receipt, self.signing_key)
            self.publisher.publish("update.envelope", item.topic, envelope, key=item.key)
        elif item.kind == KIND_TELEMETRY:
            # v1 items spooled by an older client stay sendable: decode picks the model by schema version.
            telemetry = decode(canonical_json(item.event))
            if not isinstance(telemetry, Telemetry | TelemetryV2):
                raise SpoolError(f"telemetry item {item.directory} holds a {telemetry.SCHEMA} event")
            self.publisher.publish("telemetry", item.topic, telemetry, key=item.key)
        else:
            raise SpoolError(f"spool item {item.directory} has unknown kind {item.kind!r}")
        # Only now, after the bus acknowledged the write, is the item done.
        self.outbox.mark_done(item)

    def _deliver_one(self, item: SpoolItem, deadline: float | None) -> None:
        def note_retry(attempt: int, exc: BaseException, delay: float) -> None:
            details = {"item_id": item.item_id, "attempt": attempt, "delay_s": round(delay, 3), "error": str(exc)}
            self._note("spool.retry", details)

        # One trace per item: its payload upload (HTTP, traceparent header) and its publish (bus record headers) are
        # children of this span, and so is what the control plane does with them.
        attributes = {"fednested.item_id": item.item_id, "fednested.kind": item.kind}
        with tracer().start_as_current_span(f"deliver {item.kind}", attributes=attributes):
            call_with_retries(
                f"send {item.kind} {item.item_id}",
                functools.partial(self.send, item),
                self.retry,
                retry_on=(ControlPlaneUnavailable, BusError),
                rng=self.rng,
                sleep=self.sleep,
                deadline=deadline,
                on_retry=note_retry,
            )

    def deliver_pending(self, *, deadline: float | None = None) -> DeliveryReport:
        """Send every pending item in order; stops at the first item whose retries run out (the link is down)."""
        report = DeliveryReport()
        for item in self.outbox.pending():
            try:
                self._deliver_one(item, deadline)
            except RetriesExhausted as exc:
                # Keep order: later items wait behind this one until the link is back.
                report.last_error = str(exc)
                break
            except (ControlPlaneRejected, OutboundRefused, SpoolError, ValueError) as exc:
                self.outbox.mark_failed(item, str(exc))
                report.failed.append((item.item_id, str(exc)))
                self._note("spool.failed", {"item_id": item.item_id, "error": str(exc)})
                continue
            report.delivered.append(item.item_id)
            self._note("spool.delivered", {"item_id": item.item_id, "kind": item.kind})
        report.pending = len(self.outbox.pending())
        return report
