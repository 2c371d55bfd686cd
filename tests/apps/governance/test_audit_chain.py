"""The audit trail's hash chain on PostgreSQL: events are sealed after their transaction commits, and editing,
deleting, reordering or rewriting sealed events is detected, naming the first broken link."""

import itertools
import json
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from django.db import connection, transaction
from django.test import Client
from typer.testing import CliRunner

from apps.governance.actors import Actor
from apps.governance.audit import record_audit_event
from apps.governance.chain import (
    GENESIS_HASH,
    anchor_chain,
    link_hash,
    read_anchors,
    seal_pending,
    verify_chain,
)
from apps.governance.cli import app as audit_cli
from apps.governance.export import verify_export
from apps.governance.models import AuditEvent

pytestmark = pytest.mark.django_db

# The tests run inside one transaction that is never committed (faster than transactional tests, which empty every
# table after each test); the sealer's on-commit callbacks run when each audited block leaves its capture.
Capture = Callable[..., AbstractContextManager[Any]]


@pytest.fixture
def record(django_capture_on_commit_callbacks: Capture) -> Callable[..., list[AuditEvent]]:
    def build(count: int, *, start: int = 0) -> list[AuditEvent]:
        return _record(django_capture_on_commit_callbacks, count, start=start)

    return build


def _record(capture: Capture, count: int, *, start: int = 0) -> list[AuditEvent]:
    events = []
    for index in range(start, start + count):
        with capture(execute=True), transaction.atomic():
            events.append(
                record_audit_event(
                    actor=Actor.automation(f"worker:test-{index % 3}"),
                    verb="federation.update.recorded",
                    data={"index": index, "loss": 0.1 * index, "note": "naïve — ünïcode"},
                )
            )
    return events


def _chain() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(seq__isnull=False).order_by("seq"))


def test_events_are_sealed_when_their_transaction_commits_and_the_chain_holds(
    record: Callable[..., list[AuditEvent]],
) -> None:
    record(5)
    chain = _chain()
    assert [event.seq for event in chain] == [1, 2, 3, 4, 5]
    assert chain[0].prev_hash == GENESIS_HASH
    for before, after in itertools.pairwise(chain):
        assert after.prev_hash == before.entry_hash
    report = verify_chain()
    assert report.ok, report.broken
    assert (report.events, report.head_seq, report.unsealed) == (5, 5, 0)
    assert report.head_hash == chain[-1].entry_hash


def test_a_rolled_back_transaction_leaves_no_link_and_no_gap(record: Callable[..., list[AuditEvent]]) -> None:
    record(2)

    def roll_back() -> None:
        with transaction.atomic():
            record_audit_event(actor=Actor.automation("worker:test"), verb="never.committed")
            raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        roll_back()
    record(1, start=2)
    assert [event.seq for event in _chain()] == [1, 2, 3]
    assert verify_chain().ok


def test_an_edited_payload_actor_action_or_time_is_detected_at_its_link(
    record: Callable[..., list[AuditEvent]],
) -> None:
    events = record(6)
    edits: list[dict[str, Any]] = [
        {"data": {"index": 2, "loss": 0.0}},
        {"actor_label": "olivia-officer"},
        {"verb": "governance.approval.approved"},
        {"object_id": "42"},
        {"object_type": "accounts.user"},
        {"actor_kind": "person"},
    ]
    for edit in edits:
        target = events[2]
        original = AuditEvent.objects.filter(pk=target.pk).values(*edit).get()
        AuditEvent.objects.filter(pk=target.pk).update(**edit)
        report = verify_chain()
        assert not report.ok
        assert report.broken_seq == 3
        assert report.broken_event_id == target.pk
        assert "does not match its hash" in (report.broken or "")
        AuditEvent.objects.filter(pk=target.pk).update(**original)
        assert verify_chain().ok
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE governance_auditevent SET created_at = created_at + interval '1 second' WHERE id = %s",
            [events[4].pk],
        )
    report = verify_chain()
    assert not report.ok
    assert report.broken_seq == 5


def test_a_deleted_event_is_detected_as_a_gap(record: Callable[..., list[AuditEvent]]) -> None:
    events = record(5)
    AuditEvent.objects.filter(pk=events[1].pk).delete()
    report = verify_chain()
    assert not report.ok
    assert report.broken_seq == 2
    assert "seq 2 is missing" in (report.broken or "")
    assert report.events == 1


def test_reordered_events_are_detected(record: Callable[..., list[AuditEvent]]) -> None:
    events = record(5)
    first, second = events[1], events[3]
    # Swap their places (through a free seq, because seq is unique).
    AuditEvent.objects.filter(pk=first.pk).update(seq=-1)
    AuditEvent.objects.filter(pk=second.pk).update(seq=2)
    AuditEvent.objects.filter(pk=first.pk).update(seq=4)
    report = verify_chain()
    assert not report.ok
    assert report.broken_seq == 2
    assert report.broken_event_id == second.pk


def test_an_event_moved_to_the_end_swapped_contents_and_the_first_event_deleted_are_detected(
    record: Callable[..., list[AuditEvent]],
) -> None:
    events = record(5)
    # An event moved after the last one: a gap where it was.
    AuditEvent.objects.filter(pk=events[2].pk).update(seq=6)
    report = verify_chain()
    assert (report.ok, report.broken_seq) == (False, 3)
    AuditEvent.objects.filter(pk=events[2].pk).update(seq=3)
    assert verify_chain().ok

    # Two events' contents swapped while each keeps its place and hashes: both links stop matching, the first named.
    fields = ("actor_label", "actor_kind", "verb", "data", "created_at")
    one, two = (AuditEvent.objects.filter(pk=e.pk).values(*fields).get() for e in (events[1], events[3]))
    AuditEvent.objects.filter(pk=events[1].pk).update(**two)
    AuditEvent.objects.filter(pk=events[3].pk).update(**one)
    report = verify_chain()
    assert (report.ok, report.broken_seq, report.broken_event_id) == (False, 2, events[1].pk)
    AuditEvent.objects.filter(pk=events[1].pk).update(**one)
    AuditEvent.objects.filter(pk=events[3].pk).update(**two)
    assert verify_chain().ok

    # The first link deleted: the chain must start at seq 1.
    AuditEvent.objects.filter(pk=events[0].pk).delete()
    report = verify_chain()
    assert (report.ok, report.broken_seq, report.events) == (False, 1, 0)
    assert "seq 1 is missing" in (report.broken or "")


def _rewrite_chain() -> None:
    """What an attacker with database access does after an edit: recompute every hash from the first link."""
    prev = GENESIS_HASH
    for event in _chain():
        event.prev_hash = prev
        event.entry_hash = prev = link_hash(event, seq=int(event.seq or 0), prev_hash=prev)
        event.save(update_fields=["prev_hash", "entry_hash"])


def test_the_anchors_catch_a_rewritten_chain_and_a_truncated_end(
    record: Callable[..., list[AuditEvent]], tmp_path: Path
) -> None:
    anchors = tmp_path / "anchors.jsonl"
    events = record(4)
    written = anchor_chain(anchors)
    assert written is not None
    assert written.seq == 4
    assert read_anchors(anchors)[0].hash == events[-1].__class__.objects.get(seq=4).entry_hash
    record(2, start=4)
    assert verify_chain(anchors).ok
    assert verify_chain(anchors).anchors_checked == 1

    AuditEvent.objects.filter(pk=events[0].pk).update(data={"index": 0, "forged": True})
    _rewrite_chain()
    report = verify_chain(anchors)
    assert not report.ok
    assert "the chain was rewritten" in (report.broken or "")
    assert report.broken_seq == 4

    AuditEvent.objects.filter(seq__gte=3).delete()
    _rewrite_chain()
    report = verify_chain(anchors)
    assert not report.ok
    assert "deleted from the end" in (report.broken or "")


def test_sealing_anchors_by_itself_once_the_interval_has_passed(
    record: Callable[..., list[AuditEvent]], settings: Any, tmp_path: Path
) -> None:
    settings.FEDNESTED_AUDIT_ANCHOR_FILE = tmp_path / "auto.jsonl"
    settings.FEDNESTED_AUDIT_ANCHOR_INTERVAL = 3600
    record(3)
    anchors = read_anchors(tmp_path / "auto.jsonl")
    # The first seal anchors (no anchor yet); the next ones are within the hour and do not.
    assert [anchor.seq for anchor in anchors] == [1]
    assert verify_chain().ok


def test_unsealed_events_are_reported_and_sealed_later(record: Callable[..., list[AuditEvent]]) -> None:
    record(2)
    # An event whose sealing never ran (the process died between commit and seal).
    AuditEvent.objects.create(actor_label="worker:test", verb="federation.update.recorded", data={})
    report = verify_chain()
    assert report.ok
    assert report.unsealed == 1
    assert "not sealed yet" in report.warnings[0]
    assert seal_pending() == 1
    assert verify_chain().unsealed == 0
    assert verify_chain().events == 3


def test_audit_verify_cli_names_the_first_broken_link(record: Callable[..., list[AuditEvent]], tmp_path: Path) -> None:
    events = record(3)
    runner = CliRunner()
    anchors = tmp_path / "anchors.jsonl"
    result = runner.invoke(audit_cli, ["verify", "--anchors", str(anchors)])
    assert result.exit_code == 0, result.output
    assert "audit chain holds: 3 sealed event(s)" in result.output
    AuditEvent.objects.filter(pk=events[1].pk).update(data={"tampered": 1})
    result = runner.invoke(audit_cli, ["verify", "--json", "--anchors", str(anchors)])
    assert result.exit_code == 1
    body = json.loads(result.stdout)
    assert body["ok"] is False
    assert body["broken_seq"] == 2
    assert body["broken_event_id"] == events[1].pk
    anchors.write_text("not json\n")
    result = runner.invoke(audit_cli, ["verify", "--anchors", str(anchors)])
    assert result.exit_code == 2
    assert "line 1: not an anchor" in result.output


@pytest.mark.django_db(transaction=True)
def test_writers_committing_concurrently_get_one_unbroken_chain() -> None:
    """Real commits from several threads at once: the sealers take turns under the advisory lock, every committed
    event gets exactly one place, and the chain verifies."""
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for index in range(15):
                with transaction.atomic():
                    record_audit_event(
                        actor=Actor.automation(f"worker:{worker}"), verb="test.concurrent", data={"i": index}
                    )
                    record_audit_event(actor=Actor.automation(f"worker:{worker}"), verb="test.concurrent.second")
        except BaseException as error:  # surfaced below: an exception in a thread would otherwise vanish
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    report = verify_chain()
    assert report.ok, report.broken
    assert report.events == 90
    assert report.unsealed == 0
    assert sorted(int(seq or 0) for seq in AuditEvent.objects.values_list("seq", flat=True)) == list(range(1, 91))


def test_exports_carry_the_chain_and_verify_offline(
    record: Callable[..., list[AuditEvent]], cast: dict[str, Any], tmp_path: Path
) -> None:
    record(4)
    officer = cast["officer"].client
    response = officer.get("/api/v1/audit-events/export-jsonl/", {"verb": "federation.update.recorded"})
    assert response.status_code == 200
    assert response["Content-Type"] == "application/x-ndjson"
    assert "attachment" in response["Content-Disposition"]
    lines = b"".join(response.streaming_content).decode().splitlines()
    seqs = [json.loads(line)["seq"] for line in lines]
    # The cast's own events (enrolment, users) were sealed first, by the same seal.
    assert seqs == list(range(seqs[0], seqs[0] + 4))
    report = verify_export(lines)
    assert report.ok, report.problems
    assert (report.verified, report.stretches) == (4, 1)
    # A filtered export is stretches of the chain: every line still verifies on its own.
    assert verify_export([lines[0], lines[2]]).ok

    tampered = json.loads(lines[1])
    tampered["data"]["loss"] = 0.0
    path = tmp_path / "export.jsonl"
    path.write_text("\n".join([lines[0], json.dumps(tampered), lines[2], "{not json"]) + "\n")
    result = CliRunner().invoke(audit_cli, ["verify-export", str(path)])
    assert result.exit_code == 1
    assert f"line 2: event seq {seqs[1]}" in result.output
    assert "line 4: not an audit event" in result.output

    csv_response = officer.get("/api/v1/audit-events/export-csv/")
    assert csv_response["Content-Type"] == "text/csv"
    rows = b"".join(csv_response.streaming_content).decode().splitlines()
    assert rows[0].startswith("seq,id,created_at,actor_label,verb")
    assert cast["engineer"].client.get("/api/v1/audit-events/export-jsonl/").status_code == 403
    assert AuditEvent.objects.filter(verb="governance.audit.exported", actor_label="olivia-officer").count() == 2


def test_a_spreadsheet_formula_in_audit_text_is_made_inert(
    record: Callable[..., list[AuditEvent]], cast: dict[str, Any]
) -> None:
    record(1)
    AuditEvent.objects.create(actor_label='=HYPERLINK("x")', verb="federation.update.recorded", data={})
    rows = b"".join(cast["officer"].client.get("/api/v1/audit-events/export-csv/").streaming_content).decode()
    assert "'=HYPERLINK" in rows


def test_the_console_filters_by_object_and_time_and_exports_what_it_shows(
    record: Callable[..., list[AuditEvent]], cast: dict[str, Any], client: Client
) -> None:
    events = record(3)
    AuditEvent.objects.filter(pk=events[1].pk).update(object_type="registry.modelversion", object_id="7")
    client.force_login(cast["officer"].user)
    page = client.get("/audit/", {"object_type": "registry.modelversion", "object_id": "7"})
    assert page.status_code == 200
    assert page.content.decode().count("<tr>") == 2  # the header row and the one event
    export = client.get("/audit/export.jsonl", {"object_type": "registry.modelversion", "object_id": "7"})
    lines = b"".join(export.streaming_content).decode().splitlines()  # type: ignore[attr-defined]
    assert [json.loads(line)["id"] for line in lines] == [events[1].pk]
    later = client.get("/audit/export.jsonl", {"after": "2999-01-01T00:00"})
    assert b"".join(later.streaming_content) == b""  # type: ignore[attr-defined]
    bad = client.get("/audit/export.csv", {"after": "yesterday"})
    assert bad.status_code == 400
    assert b"Enter a valid date/time" in bad.content
    client.force_login(cast["engineer"].user)
    assert client.get("/audit/export.jsonl").status_code == 403
