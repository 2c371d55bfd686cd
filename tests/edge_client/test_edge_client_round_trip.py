"""The edge client end to end, in-process, against the protocol server and a real bus: enroll, pull and verify the
champion, train adapters, send the payload and a signed envelope, follow ModelAvailable to the next version."""

import hashlib
import json
import re
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load

from edge_client.runner import ClientRunReport, RunOptions, run_client
from edge_client.sidecar import verify_chain
from fednested.identity.keys import generate_private_key
from fednested.messaging.schemas import TelemetryV2, UpdateEnvelope
from fednested.messaging.topics import Topic


@pytest.mark.parametrize("bus_kind", ["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def test_device_sends_one_signed_update_then_follows_the_new_champion(
    tmp_path: Path, control_plane: Any, kit: Any, bus_kind: str
) -> None:
    bus = kit.bus_settings(bus_kind, tmp_path)
    control_plane.add_version(kit.assets.v1)
    control_plane.add_version(kit.assets.v2)
    control_plane.champion = "v1"
    files = kit.write_files(tmp_path / "device", control_plane, bus)
    settings = kit.settings(files, control_plane, bus)

    reports: list[ClientRunReport] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            reports.append(run_client(settings, RunOptions(rounds=1, until_version="v2", max_wait_s=240)))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    # An officer approves v2 once the device's update is in.
    kit.wait_until(lambda: bool(control_plane.payloads) or not thread.is_alive(), what="the device's upload")
    control_plane.promote("v2", bus)
    thread.join(timeout=240)
    assert not errors, errors
    [report] = reports
    assert report.stopped_because == "goals_met"
    assert report.versions == ["v1", "v2"]
    assert report.trained_on == ["v1"]
    assert report.current_version == "v2"
    assert report.pending == 0

    # The envelope: one, signed with the device credential, pointing at exactly the stored payload.
    [message] = kit.drain(bus, Topic.UPDATES)
    envelope = message.event
    assert isinstance(envelope, UpdateEnvelope)
    assert message.key == "edge-0001"
    assert report.updates_delivered == [str(envelope.update_id)]
    # Signed by the device's own key: the public key of its enrollment CSR verifies it, no other key does, and
    # the private key is a 0600 file that never left the device.
    assert envelope.verify(control_plane.device_keys["edge-0001"])
    assert not envelope.verify(generate_private_key().public_key())
    assert not envelope.model_copy(update={"examples": envelope.examples + 1}).verify(
        control_plane.device_keys["edge-0001"]
    )
    assert stat.S_IMODE((files["state"] / "device.key").stat().st_mode) == 0o600
    client_id, payload = control_plane.payloads[str(envelope.update_id)]
    assert client_id == "edge-0001"
    assert envelope.payload.sha256 == hashlib.sha256(payload).hexdigest()
    assert envelope.payload.size_bytes == len(payload)
    assert envelope.base_version == "v1"
    assert envelope.examples == 24
    assert envelope.adapter.rank == 4
    assert envelope.metrics["steps"] == 3.0

    # Only adapter factors left: per expert, A [r, in] and B [out, r] of the fused expert tensors.
    tensors = load(payload)
    assert tensors
    assert all(re.fullmatch(r"model\.layers\.\d\.mlp\.experts\.\w+/expert=\d/lora_[AB]", name) for name in tensors)
    assert {t.shape[0] for name, t in tensors.items() if name.endswith("lora_A")} == {4}

    # Routed tokens: every MoE layer routes each real trained token (padding excluded) to top-k (2) experts, which
    # is exactly the relation the control plane checks the claim against.
    per_layer: dict[str, int] = {}
    for key, count in envelope.routed_tokens.items():
        per_layer[key.split(".")[0]] = per_layer.get(key.split(".")[0], 0) + count
    assert set(per_layer) == {"0", "1"}
    assert per_layer["0"] == per_layer["1"] == 2 * envelope.metrics["tokens"] > 0

    [telemetry] = [m.event for m in kit.drain(bus, Topic.TELEMETRY)]
    assert isinstance(telemetry, TelemetryV2)  # the data engine's version: the run's tokens, per-domain entries
    assert telemetry.outcome == "succeeded"
    assert telemetry.steps == 3
    assert telemetry.tokens > 0
    assert (telemetry.base_version, telemetry.domains) == ("v1", [])

    # Version reports, the verified snapshots on disk, and the state directory's current version.
    assert control_plane.heartbeats == [("edge-0001", "v1"), ("edge-0001", "v2")]
    assert (files["state"] / "current_version").read_text() == "v2"
    for version in ("v1", "v2"):
        stored = files["state"] / "versions" / version / "manifest.json"
        assert stored.read_bytes() == (getattr(kit.assets, version) / "manifest.json").read_bytes()

    # The local audit log verifies, and neither its path nor any of its hashes ever went out.
    audit = files["state"] / "audit" / "audit.jsonl"
    chain = verify_chain(audit)
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    actions = [entry["action"] for entry in entries]
    assert "device.enrolled" in actions
    assert "training.finished" in actions
    assert actions.count("outbound.allowed") >= 6  # enroll, champion, files, payload, envelope, telemetry, heartbeats
    assert "outbound.refused" not in actions
    sent = b"".join(r.path.encode() + json.dumps(r.headers).encode() + r.body for r in control_plane.requests)
    assert str(audit).encode() not in sent
    assert b"audit.jsonl" not in sent
    assert chain.head_hash.encode() not in sent
    assert all(entry["hash"].encode() not in sent for entry in entries)
    bus_bytes = b"".join(m.raw for topic in Topic for m in kit.drain(bus, topic, quiet_s=0.3))
    assert b"audit" not in bus_bytes


def test_second_run_reuses_the_credential_and_trains_once_per_version(
    tmp_path: Path, control_plane: Any, kit: Any, embedded_bus: Any
) -> None:
    control_plane.add_version(kit.assets.v1)
    control_plane.champion = "v1"
    files = kit.write_files(tmp_path / "device", control_plane, embedded_bus)
    settings = kit.settings(files, control_plane, embedded_bus)
    first = run_client(settings, RunOptions(rounds=1, max_wait_s=120))
    assert first.stopped_because == "goals_met"
    assert len(first.updates_delivered) == 1
    credential_file = files["state"] / "credential.json"
    assert oct(credential_file.stat().st_mode & 0o777) == oct(0o600)
    enrolls = [r for r in control_plane.requests if r.path == "/api/v1/enroll/"]
    assert len(enrolls) == 1

    second = run_client(settings, RunOptions(until_version="v1", max_wait_s=60))
    assert second.stopped_because == "goals_met"
    assert second.trained_on == []  # v1 already has an update from this device
    assert len([r for r in control_plane.requests if r.path == "/api/v1/enroll/"]) == 1
    assert len(control_plane.payloads) == 1
    assert len(kit.drain(embedded_bus, Topic.UPDATES)) == 1
