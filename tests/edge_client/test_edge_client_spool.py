"""The outbox: updates are spooled atomically before sending; when the control plane is unreachable they wait and
retry with backoff, and are delivered exactly once when it is back; refused items are kept aside with the reason."""

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save

from edge_client.sidecar import AuditLog, Sidecar, example_policy, load_policy, verify_chain
from edge_client.spool import KIND_UPDATE, Deliverer, Outbox, SpoolError
from edge_client.transport.bus import EventPublisher
from edge_client.transport.http import ControlPlaneClient
from edge_client.transport.retry import RetryPolicy
from fednested.identity.keys import generate_private_key
from fednested.messaging.bus import make_bus
from fednested.messaging.topics import Topic

API_TOKEN = "fna_device-key"
DEVICE_KEY = generate_private_key()
UPDATE_ID = "6f1c2b8e-0d53-4a47-9a3c-1b2e3f405162"
ADAPTERS = {
    "model.layers.0.mlp.experts.down_proj/expert=1/lora_A": torch.ones(4, 8),
    "model.layers.0.mlp.experts.down_proj/expert=1/lora_B": torch.zeros(16, 4),
}


def _envelope_fields() -> dict[str, Any]:
    return {
        "schema": "UpdateEnvelope",
        "schema_version": 1,
        "update_id": UPDATE_ID,
        "client_id": "edge-1",
        "base_version": "v1",
        "round_id": None,
        "examples": 12,
        "routed_tokens": {"0.1": 40},
        "metrics": {"train_loss": 2.5},
        "adapter": {"rank": 4, "alpha": 8.0, "target_modules": ["down_proj"]},
        "created_at": "2025-06-01T12:00:00+00:00",
    }


def _spool_update(outbox: Outbox) -> None:
    def write_payload(directory: Path) -> Path:
        path = directory / "adapters.safetensors"
        path.write_bytes(save(ADAPTERS))
        return path

    outbox.add(UPDATE_ID, KIND_UPDATE, Topic.UPDATES, "edge-1", _envelope_fields(), write_payload=write_payload)


@pytest.fixture
def parts(tmp_path: Path, control_plane: Any, embedded_bus: Any) -> Any:
    control_plane.api_tokens[API_TOKEN] = "edge-1"
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(example_policy(control_plane.url)))
    sidecar = Sidecar(load_policy(policy), AuditLog(tmp_path / "audit.jsonl"))
    api = ControlPlaneClient(control_plane.url, sidecar, api_token=API_TOKEN, timeout_s=2.0)
    bus = make_bus(embedded_bus)
    slept: list[float] = []
    outbox = Outbox(tmp_path / "spool")
    deliverer = Deliverer(
        outbox,
        api,
        EventPublisher(bus, embedded_bus, sidecar),
        signing_key=DEVICE_KEY,
        retry=RetryPolicy(initial_delay_s=0.2, multiplier=2.0, max_delay_s=1.0, jitter=0.5, max_attempts=5),
        rng=random.Random(1),
        sleep=slept.append,
        on_event=sidecar.record,
    )
    yield outbox, deliverer, slept, sidecar
    bus.close()
    api.close()


def test_spooled_item_is_complete_on_disk_before_anything_is_sent(parts: Any, control_plane: Any) -> None:
    outbox, _, _, _ = parts
    _spool_update(outbox)
    [item] = outbox.pending()
    assert item.item_id == UPDATE_ID
    assert item.payload_file is not None
    assert item.payload_file.read_bytes() == save(ADAPTERS)
    assert json.loads((item.directory / "item.json").read_bytes())["event"] == _envelope_fields()
    assert not list((outbox.root / "tmp").iterdir())
    assert control_plane.requests == []
    with pytest.raises(SpoolError, match="already exists"):
        _spool_update(outbox)


def test_unreachable_control_plane_queues_with_backoff_then_delivers_exactly_once(
    parts: Any, control_plane: Any, embedded_bus: Any, kit: Any
) -> None:
    outbox, deliverer, slept, sidecar = parts
    _spool_update(outbox)
    control_plane.stop()  # connection refused: the control plane is really gone

    report = deliverer.deliver_pending()
    assert report.delivered == []
    assert report.pending == 1
    assert "gave up after 5 attempt" in (report.last_error or "")
    assert len(slept) == 4
    ceilings = [0.2, 0.4, 0.8, 1.0]
    assert all(c * 0.5 <= d <= c for d, c in zip(slept, ceilings, strict=True))
    assert kit.drain(embedded_bus, Topic.UPDATES, quiet_s=0.3) == []

    control_plane.start()  # back on the same port
    report = deliverer.deliver_pending()
    assert report.delivered == [UPDATE_ID]
    assert report.pending == 0
    assert outbox.ids("done") == [UPDATE_ID]
    [message] = kit.drain(embedded_bus, Topic.UPDATES)
    assert str(message.event.update_id) == UPDATE_ID
    assert message.event.verify(DEVICE_KEY.public_key())
    assert message.event.payload.sha256 == hashlib.sha256(save(ADAPTERS)).hexdigest()
    # done/ keeps the record but not the payload bytes
    assert not list((outbox.root / "done").rglob("*.safetensors"))
    retries = [json.loads(line) for line in sidecar.audit.path.read_text().splitlines() if '"spool.retry"' in line]
    assert [entry["details"]["attempt"] for entry in retries] == [1, 2, 3, 4]
    verify_chain(sidecar.audit.path)


def test_5xx_answers_are_retried_like_an_outage(parts: Any, control_plane: Any, embedded_bus: Any, kit: Any) -> None:
    outbox, deliverer, _, _ = parts
    _spool_update(outbox)
    control_plane.unavailable.add("payload")
    assert deliverer.deliver_pending().pending == 1
    assert sum(r.method == "PUT" for r in control_plane.requests) == 5
    control_plane.unavailable.clear()
    assert deliverer.deliver_pending().delivered == [UPDATE_ID]
    assert len(kit.drain(embedded_bus, Topic.UPDATES)) == 1


def test_resend_after_a_crash_between_publish_and_done_is_byte_identical(
    parts: Any, control_plane: Any, embedded_bus: Any, kit: Any
) -> None:
    """At-least-once: the duplicate carries the same update id and bytes, so the ingest worker drops it."""
    outbox, deliverer, _, _ = parts
    _spool_update(outbox)
    [item] = outbox.pending()
    original_mark_done = outbox.mark_done
    outbox.mark_done = lambda _item: None  # the process "dies" right after the broker's ack
    deliverer.send(item)
    outbox.mark_done = original_mark_done
    assert deliverer.deliver_pending().delivered == [UPDATE_ID]
    first, second = kit.drain(embedded_bus, Topic.UPDATES)
    assert first.raw == second.raw
    assert sum(r.method == "PUT" for r in control_plane.requests) == 1  # the receipt was kept, no second upload


def test_permanently_refused_item_is_kept_aside_with_the_reason(
    parts: Any, control_plane: Any, kit: Any, embedded_bus: Any
) -> None:
    outbox, deliverer, _, _ = parts
    control_plane.payloads[UPDATE_ID] = ("edge-1", b"a different payload")
    _spool_update(outbox)
    report = deliverer.deliver_pending()
    assert report.delivered == []
    assert [item_id for item_id, _ in report.failed] == [UPDATE_ID]
    assert "HTTP 409 [conflict]" in report.failed[0][1]
    assert outbox.ids("failed") == [UPDATE_ID]
    failure = json.loads(next((outbox.root / "failed").iterdir()).joinpath("failure.json").read_text())
    assert "409" in failure["reason"]
    assert list((outbox.root / "failed").rglob("*.safetensors"))  # kept for the operator, not dropped
    assert kit.drain(embedded_bus, Topic.UPDATES, quiet_s=0.3) == []


def test_payload_the_sidecar_refuses_never_leaves(parts: Any, control_plane: Any, kit: Any, embedded_bus: Any) -> None:
    outbox, deliverer, _, _ = parts

    def write_base_weights(directory: Path) -> Path:
        path = directory / "adapters.safetensors"
        path.write_bytes(save(ADAPTERS | {"model.embed_tokens.weight": torch.zeros(10, 8)}))
        return path

    outbox.add(UPDATE_ID, KIND_UPDATE, Topic.UPDATES, "edge-1", _envelope_fields(), write_payload=write_base_weights)
    report = deliverer.deliver_pending()
    assert "sidecar refused update.payload" in report.failed[0][1]
    assert "tensor 'model.embed_tokens.weight'" in report.failed[0][1]
    assert control_plane.payloads == {}
    assert not any(r.method == "PUT" for r in control_plane.requests)
    assert kit.drain(embedded_bus, Topic.UPDATES, quiet_s=0.3) == []


def test_interrupted_add_leaves_nothing_queued(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "spool")

    def crash(directory: Path) -> Path:
        (directory / "adapters.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        outbox.add(UPDATE_ID, KIND_UPDATE, Topic.UPDATES, "edge-1", _envelope_fields(), write_payload=crash)
    assert outbox.pending() == []
    reopened = Outbox(tmp_path / "spool")  # a restart sweeps the half-written staging directory
    assert not list((reopened.root / "tmp").iterdir())
    assert reopened.pending() == []
