"""Control events and awkward runs: malformed control events are recorded and skipped, a ModelAvailable whose
manifest hash disagrees with the API is refused, a quantized base trains and sends, a refused telemetry field
stays home, and a device that starts while the control plane is down waits and catches up."""

import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from edge_client.errors import EdgeClientError
from edge_client.runner import MAX_REMEMBERED_EVENTS, RunOptions, _remember, run_client
from fednested.messaging.embedded import write_raw_record
from fednested.messaging.topics import Topic


def _run_in_thread(settings: Any, options: RunOptions) -> tuple[threading.Thread, list[Any]]:
    """Start a client; `outcome` receives its report or the error it raised."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(run_client(settings, options))
        except Exception as exc:  # handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_malformed_control_events_are_recorded_and_skipped(
    tmp_path: Path, control_plane: Any, kit: Any, embedded_bus: Any
) -> None:
    control_plane.add_version(kit.assets.v1)
    control_plane.add_version(kit.assets.v2)
    control_plane.champion = "v1"
    files = kit.write_files(tmp_path / "device", control_plane, embedded_bus)
    thread, outcome = _run_in_thread(
        kit.settings(files, control_plane, embedded_bus), RunOptions(rounds=1, until_version="v2", max_wait_s=120)
    )
    kit.wait_until(lambda: bool(control_plane.payloads) or not thread.is_alive(), what="the device's upload")
    physical = embedded_bus.topics.physical_name(Topic.CONTROL_ROUNDS)
    write_raw_record(embedded_bus.path, physical, "v2", b'{"schema": "ModelAvailable", "schema_version": 9}')
    write_raw_record(embedded_bus.path, physical, "v2", b"not json at all")
    control_plane.promote("v2", embedded_bus)
    thread.join(timeout=120)
    [report] = outcome
    assert report.stopped_because == "goals_met"
    assert report.rejected_events == 2
    assert report.current_version == "v2"
    audit = (files["state"] / "audit" / "audit.jsonl").read_text()
    assert audit.count('"control.rejected_event"') == 2
    assert "unknown version 9 of schema 'ModelAvailable'" in audit


def test_model_available_with_another_manifest_hash_is_recorded_and_never_loaded(
    tmp_path: Path, control_plane: Any, kit: Any, embedded_bus: Any
) -> None:
    control_plane.add_version(kit.assets.v1)
    control_plane.add_version(kit.assets.v2)
    control_plane.champion = "v1"
    files = kit.write_files(tmp_path / "device", control_plane, embedded_bus)
    thread, outcome = _run_in_thread(
        kit.settings(files, control_plane, embedded_bus), RunOptions(rounds=1, until_version="v2", max_wait_s=45)
    )
    kit.wait_until(lambda: bool(control_plane.payloads) or not thread.is_alive(), what="the device's upload")
    control_plane.promote("v2", embedded_bus)
    control_plane.wrong_manifest_sha256 = True  # the API now disagrees with the event
    thread.join(timeout=120)
    # The event did not stop the device: it was recorded and ignored, and the download, checked against the API's
    # hash, never verified, so the device stayed on v1 until its time was up.
    [report] = outcome
    assert report.stopped_because == "max_wait"
    assert report.current_version == "v1"
    audit = (files["state"] / "audit" / "audit.jsonl").read_text()
    assert '"control.manifest_mismatch"' in audit
    assert not (files["state"] / "versions" / "v2").exists()
    assert (files["state"] / "current_version").read_text() == "v1"
    # Nor does a fresh start take it: the manifest it downloads does not hash to what the API says; it keeps
    # trying (a corrupt download may be transient) and never loads it.
    again = run_client(kit.settings(files, control_plane, embedded_bus), RunOptions(until_version="v2", max_wait_s=8))
    assert again.stopped_because == "max_wait"
    assert again.current_version == "v1"  # resumed from disk; v2 never loaded
    assert re.search(r"manifest\.json.*does not match the expected 0{64}", again.last_error or "")
    assert not (files["state"] / "versions" / "v2").exists()


def test_quantized_base_trains_and_sends_an_update(
    tmp_path: Path, control_plane: Any, kit: Any, embedded_bus: Any
) -> None:
    control_plane.add_version(kit.assets.v1)
    control_plane.champion = "v1"
    files = kit.write_files(tmp_path / "device", control_plane, embedded_bus)
    report = run_client(
        kit.settings(files, control_plane, embedded_bus, quantize_bits=4), RunOptions(rounds=1, max_wait_s=120)
    )
    assert len(report.updates_delivered) == 1
    [message] = kit.drain(embedded_bus, Topic.UPDATES)
    assert message.event.base_version == "v1"
    assert sum(message.event.routed_tokens.values()) > 0


def test_telemetry_field_outside_the_policy_stays_home(
    tmp_path: Path, control_plane: Any, kit: Any, embedded_bus: Any
) -> None:
    import yaml

    control_plane.add_version(kit.assets.v1)
    control_plane.champion = "v1"
    files = kit.write_files(tmp_path / "device", control_plane, embedded_bus)
    policy = yaml.safe_load(files["policy"].read_text())
    policy["metadata_fields"].remove("loss")  # this device's owner does not let the training loss out
    files["policy"].write_text(yaml.safe_dump(policy))
    report = run_client(kit.settings(files, control_plane, embedded_bus), RunOptions(rounds=1, max_wait_s=120))
    assert len(report.updates_delivered) == 1
    assert report.updates_failed == []
    [(_, reason)] = report.telemetry_failed
    assert "sidecar refused telemetry" in reason
    assert "field 'loss'" in reason
    assert kit.drain(embedded_bus, Topic.TELEMETRY, quiet_s=0.3) == []
    failed = list((files["state"] / "spool" / "failed").iterdir())
    assert len(failed) == 1
    assert "field 'loss'" in json.loads((failed[0] / "failure.json").read_text())["reason"]


def test_device_started_while_the_control_plane_is_down_catches_up(
    tmp_path: Path, control_plane: Any, kit: Any, embedded_bus: Any
) -> None:
    control_plane.add_version(kit.assets.v1)
    control_plane.champion = "v1"
    files = kit.write_files(tmp_path / "device", control_plane, embedded_bus)
    control_plane.stop()
    with pytest.raises(EdgeClientError, match="enroll: gave up after"):
        run_client(kit.settings(files, control_plane, embedded_bus), RunOptions(rounds=1, max_wait_s=1))
    results: list[Any] = []
    thread = threading.Thread(
        target=lambda: results.append(
            run_client(
                kit.settings(
                    files,
                    control_plane,
                    embedded_bus,
                    retry=kit.fast_retry.__class__(
                        initial_delay_s=0.1, multiplier=2.0, max_delay_s=0.5, jitter=0.5, max_attempts=100
                    ),
                ),
                RunOptions(rounds=1, max_wait_s=120),
            )
        )
    )
    thread.start()
    kit.wait_until(lambda: len(control_plane.requests) == 0 and thread.is_alive(), timeout_s=5, what="client start")
    control_plane.start()
    thread.join(timeout=120)
    [report] = results
    assert report.stopped_because == "goals_met"
    assert len(report.updates_delivered) == 1
    assert len(kit.drain(embedded_bus, Topic.UPDATES)) == 1


def test_download_outage_during_a_switch_is_retried_until_the_device_moves(
    tmp_path: Path, control_plane: Any, kit: Any, embedded_bus: Any
) -> None:
    control_plane.add_version(kit.assets.v1)
    control_plane.add_version(kit.assets.v2)
    control_plane.champion = "v1"
    files = kit.write_files(tmp_path / "device", control_plane, embedded_bus)
    thread, outcome = _run_in_thread(
        kit.settings(files, control_plane, embedded_bus), RunOptions(rounds=1, until_version="v2", max_wait_s=120)
    )
    kit.wait_until(lambda: bool(control_plane.payloads) or not thread.is_alive(), what="the device's upload")
    control_plane.unavailable.add("file")
    control_plane.promote("v2", embedded_bus)
    kit.wait_until(
        lambda: sum(r.path.startswith("/api/v1/versions/v2/") for r in control_plane.requests) >= 6,
        what="several failed download attempts",
    )
    control_plane.unavailable.clear()
    thread.join(timeout=120)
    [report] = outcome
    assert report.stopped_because == "goals_met"
    assert report.current_version == "v2"
    assert control_plane.heartbeats[-1] == ("edge-0001", "v2")


def test_control_plane_without_version_reports_does_not_stop_the_device(
    tmp_path: Path, control_plane: Any, kit: Any, embedded_bus: Any
) -> None:
    control_plane.add_version(kit.assets.v1)
    control_plane.champion = "v1"
    control_plane.missing_routes.add("heartbeat")
    files = kit.write_files(tmp_path / "device", control_plane, embedded_bus)
    report = run_client(
        kit.settings(files, control_plane, embedded_bus), RunOptions(rounds=1, until_version="v1", max_wait_s=120)
    )
    assert report.stopped_because == "goals_met"
    assert len(report.updates_delivered) == 1
    assert "HTTP 404" in (report.last_error or "")
    audit = (files["state"] / "audit" / "audit.jsonl").read_text()
    assert audit.count('"version.report_refused"') == 1


def test_bad_local_data_lines_are_skipped_counted_and_located_never_copied(
    tmp_path: Path, control_plane: Any, kit: Any, embedded_bus: Any
) -> None:
    control_plane.add_version(kit.assets.v1)
    control_plane.champion = "v1"
    lines = kit.assets.data_file.read_text().splitlines()
    secret = '{"prompt": "Patient Jane Roe, MRN 4471", "completion": 42}'
    data = tmp_path / "local.jsonl"
    data.write_text("\n".join([lines[0], secret, *lines[1:]]) + "\n")
    files = kit.write_files(tmp_path / "device", control_plane, embedded_bus)
    report = run_client(
        kit.settings(files, control_plane, embedded_bus, data_files=(data,)), RunOptions(rounds=1, max_wait_s=120)
    )
    assert report.bad_data_lines == 1
    assert len(report.updates_delivered) == 1
    [message] = kit.drain(embedded_bus, Topic.UPDATES)
    assert message.event.examples == len(lines)
    audit = (files["state"] / "audit" / "audit.jsonl").read_text()
    assert f"{data}:2:" in audit
    assert "Jane Roe" not in audit

    fresh_token = tmp_path / "token-2"
    fresh_token.write_text(control_plane.issue_token())
    strict = kit.settings(
        files,
        control_plane,
        embedded_bus,
        data_files=(data,),
        strict_data=True,
        state_dir=tmp_path / "strict-device",
        token_file=fresh_token,
        client_id="edge-0002",
    )
    with pytest.raises(EdgeClientError, match=rf"local data: {re.escape(str(data))}:2: .*strict mode"):
        run_client(strict, RunOptions(rounds=1, max_wait_s=60))


def test_a_flood_of_control_events_cannot_grow_what_the_client_remembers() -> None:
    memory: dict[str, Any] = {}
    for index in range(MAX_REMEMBERED_EVENTS * 4):
        _remember(memory, f"v{index}", index)
    assert len(memory) == MAX_REMEMBERED_EVENTS
    assert next(iter(memory)) == f"v{MAX_REMEMBERED_EVENTS * 3}"  # the oldest went first
    _remember(memory, f"v{MAX_REMEMBERED_EVENTS * 3}", "again")  # a repeat moves to the newest end
    assert list(memory)[-1] == f"v{MAX_REMEMBERED_EVENTS * 3}"
