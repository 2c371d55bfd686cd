"""Fixtures for the edge client tests: a control plane that speaks docs/api/device-protocol.md over real HTTP (a
small threading server the tests can break, slow down and restart), real model versions of the `tiny` preset,
local JSONL data, and a real bus (embedded; Kafka as well when FEDNESTED_KAFKA_BOOTSTRAP is set)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from edge_client.runner import ClientSettings
from edge_client.sidecar import example_policy
from edge_client.transport.retry import RetryPolicy
from fednested.adapters import ExpertLoraConfig
from fednested.checkpoints import save_version
from fednested.data import CorpusConfig, generate_corpus, record_texts, train_bpe_tokenizer, write_jsonl
from fednested.data.tokenizer import BpeTokenizerConfig
from fednested.identity.keys import csr_public_key, load_csr, public_key_fingerprint
from fednested.messaging.bus import Message, bootstrap_topics, make_bus
from fednested.messaging.schemas import ModelAvailable
from fednested.messaging.settings import EmbeddedBusSettings, KafkaBusSettings
from fednested.messaging.topics import Topic, TopicsConfig
from fednested.models import build_model
from fednested.training.edge import EdgeTrainConfig

BusSettings = KafkaBusSettings | EmbeddedBusSettings


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class _QuietServer(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client the test killed mid-request leaves a broken pipe behind: expected, not a server fault.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass
class ControlPlaneServer:
    """The device-facing half of the control plane, in memory, over real HTTP on 127.0.0.1.

    Knobs: `unavailable` (request kinds answered 503: "enroll", "champion", "file", "payload", "heartbeat"),
    `missing_routes` (kinds answered 404, as by a server that does not offer them),
    `corrupt_downloads` (next N file downloads get one byte flipped), `wrong_manifest_sha256`, `hold_puts` (a PUT
    stores the payload, then waits for the event before answering), `stop()`/`start()` (really unreachable).
    """

    enrollment_tokens: dict[str, str] = field(default_factory=dict)
    api_tokens: dict[str, str] = field(default_factory=dict)
    # The public key of each enrolled device's CSR: what its envelopes must verify under.
    device_keys: dict[str, ec.EllipticCurvePublicKey] = field(default_factory=dict)
    versions: dict[str, Path] = field(default_factory=dict)
    champion: str | None = None
    payloads: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    heartbeats: list[tuple[str, str]] = field(default_factory=list)
    requests: list[RecordedRequest] = field(default_factory=list)
    unavailable: set[str] = field(default_factory=set)
    missing_routes: set[str] = field(default_factory=set)
    corrupt_downloads: int = 0
    wrong_manifest_sha256: bool = False
    hold_puts: threading.Event | None = None
    payload_stored: threading.Event = field(default_factory=threading.Event)
    port: int = 0
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        plane = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # keep test output readable
                return

            def do_GET(self) -> None:
                plane.handle(self, "GET")

            def do_POST(self) -> None:
                plane.handle(self, "POST")

            def do_PUT(self) -> None:
                plane.handle(self, "PUT")

        server = _QuietServer(("127.0.0.1", self.port), Handler)
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def issue_token(self, state: str = "fresh") -> str:
        token = f"fet_{secrets.token_urlsafe(16)}"
        self.enrollment_tokens[token] = state
        return token

    def add_version(self, directory: Path) -> str:
        manifest = json.loads((directory / "manifest.json").read_bytes())
        self.versions[manifest["version_id"]] = directory
        return str(manifest["version_id"])

    def manifest_sha256(self, version_id: str) -> str:
        return hashlib.sha256((self.versions[version_id] / "manifest.json").read_bytes()).hexdigest()

    def promote(self, version_id: str, bus_settings: BusSettings) -> None:
        """Move `champion` and announce it, as the governance service does after an officer's approval."""
        self.champion = version_id
        event = ModelAvailable(
            version_id=version_id,
            alias="champion",
            manifest_sha256=self.manifest_sha256(version_id),
            artifact_uri=f"/api/v1/versions/{version_id}/",
            published_at=datetime.now(UTC),
        )
        with make_bus(bus_settings) as bus:
            bus.publish(Topic.CONTROL_ROUNDS, event, key=version_id)

    # -- request handling -----------------------------------------------------------------------------------------

    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        with self._lock:
            self.requests.append(RecordedRequest(method, request.path, dict(request.headers.items()), body))
        routes: list[tuple[str, str, str, Callable[..., tuple[int, Any]]]] = [
            ("POST", r"/api/v1/enroll/", "enroll", self.enroll),
            ("GET", r"/api/v1/aliases/champion/", "champion", self.champion_alias),
            ("GET", r"/api/v1/versions/(?P<version>[^/]+)/files/(?P<name>[^/]+)/", "file", self.file),
            ("PUT", r"/api/v1/updates/(?P<update_id>[^/]+)/payload/", "payload", self.put_payload),
            ("POST", r"/api/v1/devices/(?P<client_id>[^/]+)/heartbeat/", "heartbeat", self.heartbeat),
        ]
        for route_method, pattern, kind, action in routes:
            match = re.fullmatch(pattern, request.path)
            if route_method == method and match and kind not in self.missing_routes:
                if kind in self.unavailable:
                    return self.respond(request, 503, {"detail": "control plane is down for maintenance"})
                status, payload = action(request, body, **match.groupdict())
                return self.respond(request, status, payload)
        self.respond(request, 404, {"detail": f"no route {method} {request.path}"})

    def respond(self, request: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        request.send_response(status)
        request.send_header(
            "Content-Type", "application/octet-stream" if isinstance(payload, bytes) else "application/json"
        )
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def device(self, request: BaseHTTPRequestHandler) -> str | None:
        scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
        return self.api_tokens.get(token) if scheme == "Token" else None

    def enroll(self, request: BaseHTTPRequestHandler, body: bytes) -> tuple[int, Any]:
        data = json.loads(body)
        state = self.enrollment_tokens.get(data.get("token", ""))
        if state is None:
            return 400, {"token": ["unknown enrollment token; ask an engineer for a new one"]}
        if state == "used":
            return 400, {"token": ["enrollment token fet_… was already used at 2025-01-01 00:00:00 UTC"]}
        if state == "expired":
            return 400, {"token": ["enrollment token fet_… expired at 2025-01-01 00:00:00 UTC"]}
        csr = load_csr(data.get("csr", ""))
        self.enrollment_tokens[data["token"]] = "used"
        api_token = f"fna_{secrets.token_urlsafe(24)}"
        self.api_tokens[api_token] = data["client_id"]
        self.device_keys[data["client_id"]] = csr_public_key(csr)
        key = {"fingerprint": public_key_fingerprint(csr_public_key(csr)), "certificate_pem": "", "serial": ""}
        body = {"device": {"client_id": data["client_id"], "status": "active"}, "api_token": api_token, "key": key}
        return 201, body | {"ca_certificate": None, "repeated": False}

    def champion_alias(self, request: BaseHTTPRequestHandler, body: bytes) -> tuple[int, Any]:
        if self.device(request) is None:
            return 401, {"detail": "unknown API token"}
        if self.champion is None:
            return 404, {"detail": "no version holds the champion alias yet", "code": "no_champion"}
        manifest = json.loads((self.versions[self.champion] / "manifest.json").read_bytes())
        sha = "0" * 64 if self.wrong_manifest_sha256 else self.manifest_sha256(self.champion)
        artifacts = [
            {
                "file_name": name,
                "sha256": entry["sha256"],
                "size_bytes": entry["bytes"],
                "partition": entry["partition"],
            }
            for name, entry in manifest["files"].items()
        ]
        version = {"version_id": self.champion, "parent": manifest["parent_version"], "manifest_sha256": sha}
        return 200, {"name": "champion", "version": {**version, "artifacts": artifacts}}

    def file(self, request: BaseHTTPRequestHandler, body: bytes, version: str, name: str) -> tuple[int, Any]:
        if self.device(request) is None:
            return 401, {"detail": "unknown API token"}
        path = self.versions.get(version, Path("/nonexistent")) / name
        if not path.is_file():
            return 404, {"detail": f"no file {name} in version {version}"}
        data = bytearray(path.read_bytes())
        if self.corrupt_downloads > 0 and name != "manifest.json":
            self.corrupt_downloads -= 1
            data[len(data) // 2] ^= 0xFF
        return 200, bytes(data)

    def put_payload(self, request: BaseHTTPRequestHandler, body: bytes, update_id: str) -> tuple[int, Any]:
        client_id = self.device(request)
        if client_id is None:
            return 401, {"detail": "unknown API token"}
        sha = hashlib.sha256(body).hexdigest()
        if request.headers.get("X-Content-SHA256") != sha:
            return 400, {"detail": "body does not hash to X-Content-SHA256", "code": "sha256_mismatch"}
        receipt = {"update_id": update_id, "uri": f"artifacts://updates/{update_id}", "sha256": sha, "bytes": len(body)}
        with self._lock:
            existing = self.payloads.get(update_id)
            if existing is not None:
                if existing[0] != client_id:
                    return 403, {"detail": "update id belongs to another device", "code": "not_owner"}
                if hashlib.sha256(existing[1]).hexdigest() != sha:
                    return 409, {"detail": "a different payload is stored under this update id", "code": "conflict"}
                return 200, receipt
            self.payloads[update_id] = (client_id, body)
        self.payload_stored.set()
        if self.hold_puts is not None:
            self.hold_puts.wait(timeout=300)
        return 201, receipt

    def heartbeat(self, request: BaseHTTPRequestHandler, body: bytes, client_id: str) -> tuple[int, Any]:
        if self.device(request) != client_id:
            return 403, {"detail": f"not device {client_id}"}
        version = json.loads(body)["current_version"]
        self.heartbeats.append((client_id, version))
        return 200, {"client_id": client_id, "current_version": version}


@pytest.fixture
def control_plane() -> Iterator[ControlPlaneServer]:
    plane = ControlPlaneServer()
    plane.start()
    yield plane
    if plane.hold_puts is not None:
        plane.hold_puts.set()
    plane.stop()


@dataclass(frozen=True)
class EdgeAssets:
    """Two real model versions (v2 is v1 with shifted expert weights) and one domain's local training data."""

    v1: Path
    v2: Path
    data_file: Path
    other_domain_file: Path


@pytest.fixture(scope="session")
def edge_assets(tmp_path_factory: pytest.TempPathFactory) -> EdgeAssets:
    root = tmp_path_factory.mktemp("edge-assets")
    corpus = generate_corpus(CorpusConfig(seed=3, train_samples=24, heldout_samples=4))
    texts = [record for domain in corpus.values() for record in domain.records("train")]
    tokenizer = train_bpe_tokenizer(record_texts(texts), BpeTokenizerConfig(vocab_size=384))
    model = build_model("tiny", vocab_size=len(tokenizer), seed=1)
    save_version(model, root / "v1", version_id="v1", parent_version=None, tokenizer=tokenizer)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".experts." in name:
                parameter.add_(0.01)
    save_version(model, root / "v2", version_id="v2", parent_version="v1", tokenizer=tokenizer)
    data_file = root / "data" / "medical.jsonl"
    write_jsonl(data_file, corpus["medical"].records("train", "prompt_completion"))
    other = root / "data" / "recipes.jsonl"
    write_jsonl(other, corpus["recipes"].records("train", "text"))
    return EdgeAssets(v1=root / "v1", v2=root / "v2", data_file=data_file, other_domain_file=other)


def kafka_servers_or_skip() -> str:
    servers = os.environ.get("FEDNESTED_KAFKA_BOOTSTRAP")
    if not servers:
        if os.environ.get("FEDNESTED_REQUIRE_SERVICES") == "1":
            pytest.fail("FEDNESTED_REQUIRE_SERVICES=1 but FEDNESTED_KAFKA_BOOTSTRAP is not set: Kafka is not running")
        pytest.skip("Kafka not running: `scripts/services.sh start && source var/services/env.sh`")
    return servers


def make_bus_settings(kind: str, tmp_path: Path) -> BusSettings:
    """Settings for a fresh bus: an embedded file in tmp_path, or Kafka topics under a prefix no other test uses."""
    topics = TopicsConfig(prefix=f"edge-{uuid.uuid4().hex[:10]}.")
    settings: BusSettings
    if kind == "embedded":
        settings = EmbeddedBusSettings(path=tmp_path / "bus.sqlite3", topics=topics, poll_interval_s=0.02)
    else:
        settings = KafkaBusSettings(bootstrap_servers=kafka_servers_or_skip(), session_timeout_ms=6000, topics=topics)
    bootstrap_topics(settings)
    return settings


def drain(bus_settings: BusSettings, topic: Topic, *, quiet_s: float = 1.0, timeout_s: float = 60.0) -> list[Message]:
    """Every record on `topic`, read by a fresh consumer group; stops after `quiet_s` without a new record."""
    messages: list[Message] = []
    with make_bus(bus_settings) as bus, bus.consumer(f"test-drain-{uuid.uuid4().hex[:8]}", [topic]) as consumer:
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last < quiet_s:
            message = consumer.poll(0.1)
            if message is not None:
                messages.append(message)
                consumer.commit(message)
                last = time.monotonic()
    return messages


FAST_RETRY = RetryPolicy(initial_delay_s=0.05, multiplier=2.0, max_delay_s=0.2, jitter=0.5, max_attempts=4)
TINY_TRAINING = EdgeTrainConfig(seq_len=64, rows_per_batch=4, max_steps=3, precision="fp32", seed=0)
TINY_ADAPTER = ExpertLoraConfig(rank=4, alpha=8.0)


def write_edge_files(
    root: Path,
    plane: ControlPlaneServer,
    assets: EdgeAssets,
    bus_settings: BusSettings,
    *,
    client_id: str = "edge-0001",
    token: str | None = None,
) -> dict[str, Path]:
    """Policy, token and tier2 config files for one device under `root`; returns their paths."""
    root.mkdir(parents=True, exist_ok=True)
    policy = root / "policy.yaml"
    servers = tuple(bus_settings.bootstrap_servers.split(",")) if isinstance(bus_settings, KafkaBusSettings) else ()
    document = example_policy(plane.url, bus_servers=servers)
    policy.write_text(yaml.safe_dump(document))
    token_file = root / "enrollment-token"
    token_file.write_text((token or plane.issue_token()) + "\n")
    config = {
        "kind": "tier2",
        "client_id": client_id,
        "control_plane_url": plane.url,
        "enrollment_token_file": "enrollment-token",
        "state_dir": "state",
        "sidecar_policy_path": "policy.yaml",
        "audit_log_path": "state/audit/audit.jsonl",
        "spool_dir": "state/spool",
        "http_timeout_s": 10.0,
        "poll_interval_s": 0.1,
        "data": {"train_files": [str(assets.data_file)]},
        "adapter": {"rank": TINY_ADAPTER.rank, "alpha": TINY_ADAPTER.alpha},
        "training": {"seq_len": 64, "rows_per_batch": 4, "max_steps": 3, "precision": "fp32", "num_threads": 1},
        "retry": {"initial_delay_s": 0.05, "multiplier": 2.0, "max_delay_s": 0.5, "jitter": 0.5, "max_attempts": 6},
        "bus": bus_settings.model_dump(mode="json"),
    }
    config_file = root / "edge.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return {"policy": policy, "token": token_file, "config": config_file, "state": root / "state"}


def client_settings(
    files: dict[str, Path], assets: EdgeAssets, bus_settings: BusSettings, **overrides: Any
) -> ClientSettings:
    """In-process settings equivalent to the config file `write_edge_files` wrote."""
    values: dict[str, Any] = {
        "client_id": "edge-0001",
        "control_plane_url": "",
        "token_file": files["token"],
        "state_dir": files["state"],
        "policy_file": files["policy"],
        "data_files": (assets.data_file,),
        "bus": bus_settings,
        "adapter": TINY_ADAPTER,
        "training": TINY_TRAINING,
        "retry": FAST_RETRY,
        "http_timeout_s": 10.0,
        "poll_interval_s": 0.05,
    }
    values.update(overrides)
    return ClientSettings(**values)


def wait_until(condition: Callable[[], bool], timeout_s: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def delete_kafka_topics(settings: KafkaBusSettings) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    names = [settings.topics.physical_name(topic) for topic in Topic]
    for future in admin.delete_topics(names).values():
        future.result(timeout=30)


@dataclass(frozen=True)
class EdgeKit:
    """The helpers above, handed to tests as a fixture (importlib mode does not let tests import conftest)."""

    assets: EdgeAssets
    fast_retry = FAST_RETRY
    training = TINY_TRAINING
    adapter = TINY_ADAPTER

    created: list[BusSettings] = field(default_factory=list)

    def bus_settings(self, kind: str, tmp_path: Path) -> BusSettings:
        settings = make_bus_settings(kind, tmp_path)
        self.created.append(settings)
        return settings

    def write_files(self, root: Path, plane: ControlPlaneServer, bus: BusSettings, **kwargs: Any) -> dict[str, Path]:
        return write_edge_files(root, plane, self.assets, bus, **kwargs)

    def settings(
        self, files: dict[str, Path], plane: ControlPlaneServer, bus: BusSettings, **overrides: Any
    ) -> ClientSettings:
        return client_settings(files, self.assets, bus, control_plane_url=plane.url, **overrides)

    def drain(self, bus: BusSettings, topic: Topic, **kwargs: Any) -> list[Message]:
        return drain(bus, topic, **kwargs)

    def wait_until(self, condition: Callable[[], bool], timeout_s: float = 120.0, what: str = "condition") -> None:
        wait_until(condition, timeout_s, what)


@pytest.fixture
def kit(edge_assets: EdgeAssets) -> Iterator[EdgeKit]:
    helpers = EdgeKit(assets=edge_assets)
    yield helpers
    for settings in helpers.created:
        if isinstance(settings, KafkaBusSettings):
            delete_kafka_topics(settings)


@pytest.fixture
def embedded_bus(tmp_path: Path) -> BusSettings:
    return make_bus_settings("embedded", tmp_path)
