"""Issue #4 end to end on the real services: PostgreSQL, Redis (Celery broker) and Apache Kafka.

Everything runs as it would in a deployment, each piece in its own process: the control plane (pytest-django's live
server), the ingest worker (`python -m workers.ingest`), the outbox relay (`python -m workers.relay`), a Celery
worker for aggregation, evaluation and core updates, and edge devices (`python -m fednested tier2 run-client`). The
test drives them only through what operators use: services for setting up the registry, the REST API (officer token)
for the approval and (engineer token) for a core update, the bus for envelopes, the console.

1. Three devices in three domains → updates → candidate → per-domain evaluation → approval through the REST API →
   every device on the new version (API and the clients' own state); the candidate beats its parent on the
   devices' domains. A fourth device, whose sidecar policy refuses its payload, keeps the update on the device
   and the round goes ahead without it. Then an engineer starts a core update of the new champion over the REST API
   (issue #9): the Celery worker (queue `training`) trains it with 2 DeepSpeed ranks on a Tier-1 JSONL the dataset
   policies allow, and a candidate appears whose lineage names the dataset, the ranks and the edge aggregate.
2. The bad-input matrix through Kafka and the separate ingest worker: each bad envelope is rejected (Update row) or
   refused (audit event) with its reason, visible in the API and in the console; the valid updates around them
   are buffered; the worker keeps running.
"""

import hashlib
import io
import json
import os
import random
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
import torch
import yaml
from confluent_kafka import Producer
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from django.conf import settings as django_settings
from django.db import connection
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient
from safetensors.torch import save as save_safetensors

from apps.accounts.choices import Role
from apps.accounts.models import User
from apps.accounts.services import create_user_with_role, issue_api_token
from apps.demo.bootstrap import BootstrapConfig, FirstVersion, build_first_version, demo_corpus, heldout_by_domain
from apps.demo.devices import DemoDevice, EdgeTrainingPlan, client_command, client_report, prepare_device
from apps.demo.processes import ManagedProcess, start_process
from apps.demo.run import register_first_version
from apps.federation import identity
from apps.federation.choices import UpdateStatus
from apps.federation.identity import publish_crl
from apps.federation.models import DeviceKey, EdgeDevice, Update
from apps.federation.services import (
    enroll_device,
    issue_enrollment_token,
    open_round,
    revoke_device,
    store_update_payload,
)
from apps.governance.actors import Actor
from apps.governance.choices import ApprovalStatus
from apps.governance.models import ApprovalRequest, AuditEvent
from apps.governance.services import approve_version, request_approval
from apps.registry.models import ModelVersion, VersionEvaluation
from apps.registry.services import ArtifactSpec, register_version
from apps.registry.storage import artifact_path
from edge_client.state import StateDir
from fednested.adapters.lora import ExpertLoraConfig, adapter_key
from fednested.checkpoints import read_manifest
from fednested.data import write_jsonl
from fednested.deltas import expert_param_shapes
from fednested.identity.ca import CertificateAuthority
from fednested.identity.keys import generate_private_key, make_csr, public_key_pem
from fednested.infra.endpoint import Endpoint, parse_endpoint
from fednested.infra.haproxy import HAProxyOptions, write_private_file
from fednested.messaging import Topic, UpdateEnvelope
from fednested.messaging.acls import apply_acls, federation_acls
from fednested.messaging.bus import bootstrap_topics, make_bus
from fednested.messaging.settings import KafkaBusSettings
from fednested.messaging.topics import TopicsConfig
from fednested.models import build_model
from tests.fednested.infra.haproxy_process import device_certificate, free_port, running_haproxy, tls_client

pytestmark = [pytest.mark.services, pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(1500)]

HOW_TO_START = "start them with `scripts/services.sh start && source var/services/env.sh`"
DOMAINS = ("medical", "legal", "recipes")
ADAPTER = ExpertLoraConfig(rank=2, alpha=4)
WAIT_S = 600.0
T = TypeVar("T")
# The deployment's Ranger-format dataset policies (docs/dataset-policies.md): the Tier-1 service principal may read
# everything under datasets/ of the artifact store.
DATASET_POLICIES = {
    "policies": [
        {
            "id": 1,
            "name": "e2e-tier1-datasets",
            "service": "fednested",
            "resources": {"dataset": {"values": ["/datasets"], "isRecursive": True}},
            "policyItems": [{"accesses": [{"type": "read", "isAllowed": True}], "users": ["svc-tier1"]}],
        }
    ]
}
# A core update small enough to add little to the test: the tiny v1, 2 ranks of ZeRO-2 on the CPU, 2 steps.
CORE_UPDATE_TRAINING = {"seq_len": 64, "rows_per_batch": 2, "max_steps": 2, "ranks": 2, "zero_stage": 2}
CORE_UPDATE_SETTINGS = {"accelerator": "cpu", "timeout_s": 300.0}


def service_setting(name: str, *, scheme: str | None = None) -> str:
    """Environment variable `name` from scripts/services.sh; fails (FEDNESTED_REQUIRE_SERVICES=1) or skips if unset."""
    value = os.environ.get(name, "")
    if value and (scheme is None or value.startswith(scheme)):
        return value
    problem = f"{name} is not set" if not value else f"{name}={value!r} is not a {scheme} URL"
    if os.environ.get("FEDNESTED_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{problem}, but FEDNESTED_REQUIRE_SERVICES=1 says the services must be there; {HOW_TO_START}")
    pytest.skip(f"{problem}: the end-to-end test needs PostgreSQL, Redis and Kafka; {HOW_TO_START}")


def child_database_url() -> str:
    """A URL for the database pytest-django created (test_<name>), so child processes share the test's rows."""
    settings_dict = connection.settings_dict
    credentials = quote(settings_dict["USER"]) + (
        f":{quote(settings_dict['PASSWORD'])}" if settings_dict["PASSWORD"] else ""
    )
    netloc = f"{credentials}@{settings_dict['HOST']}:{settings_dict['PORT']}"
    return urlunsplit(("postgres", netloc, "/" + settings_dict["NAME"], "", ""))


def private_broker_url(url: str) -> str:
    """The Celery broker on a Redis database of its own (8-15), so no other test run's worker takes our tasks."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{random.randint(8, 15)}", "", ""))


@dataclass
class ControlPlane:
    """The running system of one test: settings, child processes, and the people who operate it.

    As deployed: devices reach the control plane only through HAProxy (`device_url`, mTLS with certificates of the
    federation CA, checked against its CRL) and Kafka only on its TLS listener with ACLs; the control plane's own
    processes use the TLS listener with the control plane's certificate (`bus_settings`). `device_bus_settings` is
    what a device (a certificate with OU=device) may do on Kafka: write updates and telemetry, read control events.
    """

    root: Path
    url: str
    device_url: str
    ca_file: Path
    env: dict[str, str]
    bus_settings: KafkaBusSettings
    device_bus_settings: KafkaBusSettings
    officer: User
    officer_token: str
    engineer: User
    engineer_token: str
    processes: list[ManagedProcess] = field(default_factory=list)
    # Processes expected to exit with an error status (their test checks how); the others must not.
    may_fail: set[str] = field(default_factory=set)

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def start(self, name: str, argv: list[str], *, cwd: Path | None = None) -> ManagedProcess:
        process = start_process(
            name, argv, env=self.env, log_path=self.root / "logs" / f"{name}.log", cwd=cwd or self.root
        )
        self.processes.append(process)
        return process

    def start_ingest_worker(self) -> ManagedProcess:
        return self.start("ingest-worker", [sys.executable, "-m", "workers.ingest", "--poll-timeout", "0.5"])

    def start_relay(self) -> ManagedProcess:
        # Control events and Celery tasks leave through the outbox: without the relay nothing would be sent.
        return self.start("outbox-relay", [sys.executable, "-m", "workers.relay", "--poll-interval", "0.2"])

    def start_celery_worker(self) -> ManagedProcess:
        return self.start(
            "celery-worker",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "controlplane",
                "worker",
                "--pool",
                "solo",
                "--queues",
                # workers.training.* (core updates) go to `training` (controlplane/celery.py).
                "aggregation,evaluation,training",
                "--hostname",
                f"e2e-{uuid.uuid4().hex[:8]}@%h",
                "--loglevel",
                "INFO",
            ],
        )

    def api(self, token: str | None = None) -> APIClient:
        """A REST client with the officer's token, or with `token`."""
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {token or self.officer_token}")
        return client

    def wait_for(self, what: str, check: Callable[[], T | None], *, timeout_s: float = WAIT_S) -> T:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for process in self.processes:
                if not process.running and process.popen.returncode != 0 and process.name not in self.may_fail:
                    raise AssertionError(str(process.failure("stopped while waiting for " + what)))
            result = check()
            if result is not None:
                return result
            time.sleep(1.0)
        tails = "\n".join(f"--- {p.name} ({p.log_path}):\n{p.log_tail(15)}" for p in self.processes)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails}")


@pytest.fixture
def control_plane(transactional_db: Any, live_server: Any, settings: Any, tmp_path: Path) -> Iterator[ControlPlane]:
    """Kafka topics under a fresh prefix with the federation's ACLs, the services' CA as the federation CA, HAProxy
    with mTLS in front of the live server, an artifact store, the officer and engineer; stops every child."""
    if connection.vendor != "postgresql":
        service_setting("DATABASE_URL", scheme="postgres")
        pytest.fail(
            f"DATABASE_URL is set but the tests run on {connection.vendor}; the end-to-end test needs PostgreSQL"
        )
    plaintext = service_setting("FEDNESTED_KAFKA_BOOTSTRAP")
    bootstrap = service_setting("FEDNESTED_KAFKA_SSL_BOOTSTRAP")
    ca = CertificateAuthority.load(Path(service_setting("FEDNESTED_SERVICES_CA_DIR")))
    tls = {
        "ssl_ca": ca.certificate_path,
        "ssl_certificate": Path(service_setting("FEDNESTED_KAFKA_CONTROLPLANE_CERT")),
        "ssl_key": Path(service_setting("FEDNESTED_KAFKA_CONTROLPLANE_KEY")),
    }
    broker = private_broker_url(service_setting("CELERY_BROKER_URL", scheme="redis"))
    prefix = f"e2e-{uuid.uuid4().hex[:10]}."
    topics = TopicsConfig(prefix=prefix)
    # As an operator would: topics and ACLs made by a super user (the test broker's plaintext listener).
    admin = KafkaBusSettings(bootstrap_servers=plaintext, topics=topics)
    bootstrap_topics(admin)
    apply_acls(admin, federation_acls(topics))
    bus_settings = KafkaBusSettings(bootstrap_servers=bootstrap, topics=topics, **tls)
    device_cert, device_key, _ = device_certificate(ca, "e2e-hostile-device", tmp_path / "hostile")
    device_bus_settings = KafkaBusSettings(
        bootstrap_servers=bootstrap,
        topics=topics,
        ssl_ca=ca.certificate_path,
        ssl_certificate=device_cert,
        ssl_key=device_key,
    )
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    crl_path = tmp_path / "crl.pem"
    policies = tmp_path / "dataset-policies.json"
    policies.write_text(json.dumps(DATASET_POLICIES), encoding="utf-8")
    # The web server checks a core_update task's params against them too (no policy file: refused at creation).
    settings.FEDNESTED_DATASET_POLICIES = str(policies)
    settings.FEDNESTED_BUS = "kafka"
    settings.FEDNESTED_KAFKA_BOOTSTRAP = bootstrap
    settings.FEDNESTED_KAFKA_SSL_CA = str(tls["ssl_ca"])
    settings.FEDNESTED_KAFKA_SSL_CERTIFICATE = str(tls["ssl_certificate"])
    settings.FEDNESTED_KAFKA_SSL_KEY = str(tls["ssl_key"])
    settings.FEDNESTED_TOPIC_PREFIX = prefix
    settings.FEDNESTED_ARTIFACT_ROOT = artifacts
    settings.FEDNESTED_CA_DIR = str(ca.directory)
    settings.FEDNESTED_CRL_PATH = str(crl_path)
    identity._load_ca.cache_clear()
    publish_crl()
    # HAProxy: TLS with a server certificate of the CA, client certificates checked against the CRL, the verified
    # client id passed to Django with the shared secret; devices must use their certificate.
    secret = uuid.uuid4().hex
    settings.FEDNESTED_PROXY_SECRET = secret
    settings.FEDNESTED_DEVICES_REQUIRE_CERTIFICATE = True
    key_path, cert_path = ca.write_service("haproxy-e2e", tmp_path / "haproxy", ip_addresses=["127.0.0.1"])
    bundle = write_private_file(tmp_path / "haproxy" / "bundle.pem", cert_path.read_text() + key_path.read_text())
    proxy_options = HAProxyOptions(
        bind=Endpoint("127.0.0.1", free_port()),
        backend=parse_endpoint(urlsplit(live_server.url).netloc, what="live server"),
        certificate_bundle=bundle,
        ca_file=ca.certificate_path,
        crl_file=crl_path,
        proxy_secret=secret,
    )
    env = {
        **os.environ,
        "DATABASE_URL": child_database_url(),
        "CELERY_BROKER_URL": broker,
        "FEDNESTED_BUS": "kafka",
        "FEDNESTED_KAFKA_BOOTSTRAP": bootstrap,
        "FEDNESTED_KAFKA_SSL_CA": str(tls["ssl_ca"]),
        "FEDNESTED_KAFKA_SSL_CERTIFICATE": str(tls["ssl_certificate"]),
        "FEDNESTED_KAFKA_SSL_KEY": str(tls["ssl_key"]),
        "FEDNESTED_TOPIC_PREFIX": prefix,
        "FEDNESTED_ARTIFACT_ROOT": str(artifacts),
        "FEDNESTED_CA_DIR": str(ca.directory),
        "FEDNESTED_CRL_PATH": str(crl_path),
        "FEDNESTED_DATASET_POLICIES": str(policies),
        "PYTHONPATH": os.pathsep.join([str(django_settings.BASE_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHONUNBUFFERED": "1",
    }
    officer = create_user_with_role(username="olivia", role=Role.OFFICER, actor=Actor.automation("e2e"))
    _, officer_token = issue_api_token(officer, actor=Actor.automation("e2e"), name="e2e")
    engineer = create_user_with_role(username="eric", role=Role.ENGINEER, actor=Actor.automation("e2e"))
    _, engineer_token = issue_api_token(engineer, actor=Actor.automation("e2e"), name="e2e")
    with running_haproxy(proxy_options, tmp_path / "haproxy") as proxy:
        plane = ControlPlane(
            root=tmp_path,
            url=live_server.url,
            device_url=proxy.url,
            ca_file=ca.certificate_path,
            env=env,
            bus_settings=bus_settings,
            device_bus_settings=device_bus_settings,
            officer=officer,
            officer_token=officer_token,
            engineer=engineer,
            engineer_token=engineer_token,
        )
        try:
            yield plane
        finally:
            for process in reversed(plane.processes):
                process.stop(timeout_s=15)
            identity._load_ca.cache_clear()


@pytest.fixture(scope="module")
def first_version_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """v1 (tiny model, tokenizer, briefly pre-trained) and held-out sets, built once and copied into each store."""
    root = tmp_path_factory.mktemp("e2e-template")
    config = BootstrapConfig(train_samples=48, heldout_samples=8, pretrain_steps=6, vocab_size=512, seq_len=96)
    corpus = demo_corpus(config)
    build_first_version(corpus, config, root / "versions" / "v1")
    for domain, records in heldout_by_domain(corpus).items():
        write_jsonl(root / "heldout" / f"{domain}.jsonl", records)
    for domain in DOMAINS:
        write_jsonl(root / "train" / f"{domain}.jsonl", corpus[domain].mixed_records("train"))
    return root


def install_champion(plane: ControlPlane, template: Path) -> ModelVersion:
    """Copy v1 into the store, register it as an engineer, and promote it: eric requests, olivia approves."""
    shutil.copytree(template / "versions", plane.artifacts / "versions")
    shutil.copytree(template / "heldout", plane.artifacts / "heldout")
    directory = plane.artifacts / "versions" / "v1"
    first = FirstVersion(manifest=read_manifest(directory), directory=directory, pretraining=None)
    version = register_first_version(first, plane.engineer)
    approve_version(request_approval(version, actor=plane.engineer), actor=plane.officer, reason="baseline")
    version.refresh_from_db()
    return version


# --- 1. the federated loop ----------------------------------------------------------------------------------------


def test_devices_train_officer_approves_over_the_api_and_every_device_moves(
    control_plane: ControlPlane, first_version_template: Path
) -> None:
    plane = control_plane
    v1 = install_champion(plane, first_version_template)
    round_ = open_round(
        base_version=v1,
        buffer_size_k=len(DOMAINS),
        deadline_at=timezone.now() + timedelta(seconds=WAIT_S),
        actor=plane.engineer,
        round_id="e2e-round-1",
    )
    candidate_id = f"{round_.round_id}-candidate"
    devices = []
    for index, domain in enumerate(DOMAINS, start=1):
        device = DemoDevice(client_id=f"e2e-{domain}", domain=domain, directory=plane.root / "devices" / domain)
        _, token = issue_enrollment_token(actor=plane.engineer, note=device.client_id, domain=domain)
        config_path = prepare_device(
            device,
            records=[],
            enrollment_token=token,
            control_plane_url=plane.device_url,
            bus_path=plane.root / "unused-embedded-bus.sqlite3",
            plan=EdgeTrainingPlan(max_steps=10, seq_len=96, rows_per_batch=4, learning_rate=1e-2),
            seed=index,
        )
        shutil.copy(first_version_template / "train" / f"{domain}.jsonl", device.directory / "data" / "train.jsonl")
        use_kafka(config_path, plane)
        devices.append(device)
    tight = tight_policy_device(plane, first_version_template)
    plane.start_celery_worker()
    plane.start_ingest_worker()
    plane.start_relay()
    plane.may_fail.add("client-tight-policy")
    tight_client = plane.start(
        "client-tight-policy", client_command(tight, rounds=1, max_wait_s=WAIT_S), cwd=tight.directory
    )
    clients = {
        device.client_id: plane.start(
            f"client-{device.domain}",
            client_command(device, rounds=1, until_version=candidate_id, max_wait_s=WAIT_S),
            cwd=device.directory,
        )
        for device in devices
    }

    candidate = plane.wait_for(
        f"candidate {candidate_id}", lambda: ModelVersion.objects.filter(version_id=candidate_id).first()
    )
    request = plane.wait_for(
        "the evaluation's approval request",
        lambda: ApprovalRequest.objects.filter(version=candidate, status=ApprovalStatus.PENDING).first(),
    )
    assert request.requested_by == plane.engineer  # the engineer who opened the round asks; an officer decides
    applied = Update.objects.filter(applied_in=candidate)
    assert sorted(applied.values_list("device__client_id", flat=True)) == sorted(d.client_id for d in devices)

    # The officer decides through the REST API with their token.
    response = plane.api().post(
        f"/api/v1/approvals/{request.pk}/approve/", {"reason": "all three domains improve"}, format="json"
    )
    assert response.status_code == 200, response.content
    candidate.refresh_from_db()
    assert candidate.status == "champion"
    # Tier-1 (issue #9): an engineer starts a core update of the new champion, as an operator would; the Celery worker
    # runs it while the devices move. Checked at the end of the test.
    core_task_pk = start_core_update(plane, first_version_template)

    for client_id, process in clients.items():
        plane.wait_for(f"{client_id} to finish", lambda p=process: True if not p.running else None)
        assert process.popen.returncode == 0, process.log_tail()
        report = client_report(process.log_path)
        assert report is not None, process.log_tail()
        assert report["current_version"] == candidate_id
        assert report["trained_on"] == ["v1"]
        assert len(report["updates_delivered"]) == 1
    # The clients' own state says so too …
    for device in devices:
        assert StateDir(device.state_dir).current_version() == candidate_id
    # … and so does the control plane's device list.
    listed = plane.api().get("/api/v1/devices/").json()
    rows = listed["results"] if isinstance(listed, dict) else listed
    current = {row["client_id"]: row["current_version"] for row in rows}
    assert current == {**{d.client_id: candidate_id for d in devices}, "e2e-tight-policy": "v1"}

    # The fourth device's sidecar refused its payload: kept on the device, recorded in its local audit log, never
    # seen by the control plane; the round went ahead with the three others.
    plane.wait_for("the tight-policy client to give up", lambda: True if not tight_client.running else None)
    assert tight_client.popen.returncode == 1, tight_client.log_tail()  # it says its update was not sent
    report = client_report(tight_client.log_path)
    assert report is not None, tight_client.log_tail()
    assert report["updates_delivered"] == []
    [(item_id, reason)] = report["updates_failed"]
    assert "exceeds max_payload_bytes=1024" in reason, reason
    [kept] = (tight.state_dir / "spool" / "failed").glob(f"*-{item_id}")
    assert any(path.suffix == ".safetensors" for path in kept.rglob("*"))  # the payload itself is kept
    audit_lines = [json.loads(line) for line in (tight.state_dir / "audit" / "audit.jsonl").read_text().splitlines()]
    assert any(entry["action"] == "outbound.refused" for entry in audit_lines)
    assert not Update.objects.filter(device__client_id=tight.client_id).exists()

    # The candidate is better than its parent where the devices trained, measured on held-out data.
    scores = {row.domain: row for row in VersionEvaluation.objects.filter(version=candidate)}
    for domain in DOMAINS:
        assert scores[domain].parent_version == v1
        assert scores[domain].parent_loss is not None
        assert scores[domain].loss < scores[domain].parent_loss, domain
    # The console shows the same table to an officer.
    console = Client()
    console.force_login(plane.officer)
    page = console.get(f"/versions/{candidate_id}/").content.decode()
    for domain in DOMAINS:
        assert f'<th scope="row">{domain}</th>' in page
    assert "▼ better" in page

    # Identity, as deployed: each device enrolled with a CSR and holds a certificate of the federation CA (its key
    # never left it); through HAProxy it is known by that certificate, and its API token alone is refused.
    device = devices[0]
    state = StateDir(device.state_dir)
    certificate = x509.load_pem_x509_certificate((device.state_dir / "device.crt").read_bytes())
    certificate.verify_directly_issued_by(x509.load_pem_x509_certificate(plane.ca_file.read_bytes()))
    key = DeviceKey.objects.get(device__client_id=device.client_id, serial=format(certificate.serial_number, "x"))
    assert key.public_key_pem == public_key_pem(state.device_key().public_key())
    token = state.load_credential().api_token  # type: ignore[union-attr]
    with tls_client(plane.ca_file, (device.state_dir / "device.crt", device.state_dir / "device.key")) as mtls:
        me = mtls.get(f"{plane.device_url}/api/v1/me/")
        assert (me.status_code, me.json()["client_id"]) == (200, device.client_id)
    with tls_client(plane.ca_file) as anonymous:
        heartbeat = anonymous.post(
            f"{plane.device_url}/api/v1/devices/{device.client_id}/heartbeat/",
            json={"current_version": "v1"},
            headers={"Authorization": f"Token {token}"},
        )
        assert (heartbeat.status_code, heartbeat.json()["code"]) == (403, "client_certificate_required")
        only_token = anonymous.get(f"{plane.device_url}/api/v1/me/", headers={"Authorization": f"Token {token}"})
        assert (only_token.status_code, only_token.json()["code"]) == (401, "client_certificate_required")

    check_core_update(plane, core_task_pk, champion=candidate, base=v1)


def start_core_update(plane: ControlPlane, template: Path) -> int:
    """Write a small Tier-1 JSONL into the store and create a core_update task over the REST API with the engineer's
    token; returns the task's id. The relay hands it to the Celery worker's `training` queue."""
    dataset = plane.artifacts / "datasets" / "tier1.jsonl"
    dataset.parent.mkdir(parents=True, exist_ok=True)
    lines = (template / "train" / "medical.jsonl").read_text(encoding="utf-8").splitlines()[:16]
    dataset.write_text("\n".join(lines) + "\n", encoding="utf-8")
    params = {
        "datasets": ["datasets/tier1.jsonl"],
        "training": CORE_UPDATE_TRAINING,
        "core_update": CORE_UPDATE_SETTINGS,
    }
    response = plane.api(plane.engineer_token).post(
        "/api/v1/tasks/", {"kind": "core_update", "params": params}, format="json"
    )
    assert response.status_code == 201, response.content
    task_pk: int = response.json()["id"]
    return task_pk


def check_core_update(plane: ControlPlane, task_pk: int, *, champion: ModelVersion, base: ModelVersion) -> None:
    """The core update's candidate: registered by the worker with its lineage (dataset with sha256, DeepSpeed ranks,
    the edge aggregate folded in), a child of the champion, and handed to evaluation like an edge aggregate."""
    api = plane.api(plane.engineer_token)

    def finished() -> dict[str, Any] | None:
        task = api.get(f"/api/v1/tasks/{task_pk}/").json()
        return task if task["status"] in {"succeeded", "failed"} else None

    task = plane.wait_for(f"core update task {task_pk}", finished, timeout_s=300)
    assert (task["status"], task["error"]) == ("succeeded", ""), task
    assert [decision["outcome"] for decision in task["policy_decisions"]] == ["allowed"]
    version = ModelVersion.objects.get(version_id=f"core-task-{task_pk}")
    assert version.parent == champion
    lineage = version.manifest["lineage"]
    assert lineage["kind"] == "core_update"
    assert lineage["champion"]["version_id"] == base.version_id  # the line's last core update: its first version
    assert [entry["version_id"] for entry in lineage["edge_aggregates"]] == [champion.version_id]
    (dataset,) = lineage["datasets"]
    data = (plane.artifacts / "datasets" / "tier1.jsonl").read_bytes()
    assert dataset["sha256"] == hashlib.sha256(data).hexdigest()
    assert lineage["deepspeed"]["ranks"] == 2
    assert lineage["training"]["steps"] == CORE_UPDATE_TRAINING["max_steps"]
    listed = api.get(f"/api/v1/versions/{version.version_id}/lineage/")
    assert listed.status_code == 200, listed.content
    plane.wait_for(
        "the core update candidate's approval request",
        lambda: ApprovalRequest.objects.filter(version=version, status=ApprovalStatus.PENDING).first(),
        timeout_s=300,
    )


def tight_policy_device(plane: ControlPlane, template: Path) -> DemoDevice:
    """A device whose owner's sidecar policy allows 1 KiB per payload: any adapter update is larger."""
    device = DemoDevice(client_id="e2e-tight-policy", domain="legal", directory=plane.root / "devices" / "tight")
    _, token = issue_enrollment_token(actor=plane.engineer, note=device.client_id, domain="legal")
    config_path = prepare_device(
        device,
        records=[],
        enrollment_token=token,
        control_plane_url=plane.device_url,
        bus_path=plane.root / "unused-embedded-bus.sqlite3",
        plan=EdgeTrainingPlan(max_steps=2, seq_len=96),
        seed=9,
    )
    shutil.copy(template / "train" / "legal.jsonl", device.directory / "data" / "train.jsonl")
    use_kafka(config_path, plane)
    policy_path = device.directory / "policy.yaml"
    policy = yaml.safe_load(policy_path.read_text())
    policy["max_payload_bytes"] = 1024
    policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return device


def use_kafka(config_path: Path, plane: ControlPlane) -> None:
    """Point a device (config and sidecar policy) at HAProxy (trusting the federation CA) and at the broker's TLS
    listener with the certificate and key enrollment leaves in its state directory, with the test's topic prefix."""
    bus_settings = plane.device_bus_settings
    config = yaml.safe_load(config_path.read_text())
    state = Path(config["state_dir"])
    config["control_plane_ca_file"] = str(plane.ca_file)
    config["bus"] = {
        "kind": "kafka",
        "bootstrap_servers": bus_settings.bootstrap_servers,
        "topics": {"prefix": bus_settings.topics.prefix},
        "ssl_ca": str(state / "ca.crt"),
        "ssl_certificate": str(state / "device.crt"),
        "ssl_key": str(state / "device.key"),
    }
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    # The device owner's policy must name the brokers too, or the sidecar refuses every publish.
    policy_path = Path(config["sidecar_policy_path"])
    policy = yaml.safe_load(policy_path.read_text())
    policy["bus_servers"] = bus_settings.bootstrap_servers.split(",")
    policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))


# --- 2. bad input, end to end ---------------------------------------------------------------------------------------


def promote_child(plane: ControlPlane, parent: ModelVersion, version_id: str) -> ModelVersion:
    """Register `version_id` as a child of `parent` sharing its files (enough for lineage) and make it champion."""
    manifest = {**parent.manifest, "version_id": version_id, "parent_version": parent.version_id}
    child = register_version(
        family=parent.family,
        version_id=version_id,
        manifest=manifest,
        artifacts=[
            ArtifactSpec(
                file_name=a.file_name,
                sha256=a.sha256,
                size_bytes=a.size_bytes,
                partition=a.partition,
                layer=a.layer,
                expert_index=a.expert_index,
            )
            for a in parent.artifacts.all()
        ],
        artifact_uri=parent.artifact_uri,
        actor=plane.engineer,
        parent=parent,
    )
    approve_version(request_approval(child, actor=plane.engineer), actor=plane.officer, reason="newer champion")
    return child


@dataclass
class Sender:
    """An enrolled device as the bad-input test plays it: its row and its signing key."""

    device: EdgeDevice
    api_token: str
    # The device's own private key (its CSR's key at enrollment): what the control plane verifies envelopes with.
    signing_key: ec.EllipticCurvePrivateKey


def enroll(plane: ControlPlane, client_id: str) -> Sender:
    _, token = issue_enrollment_token(actor=plane.engineer, note=client_id)
    key = generate_private_key()
    enrollment = enroll_device(token=token, client_id=client_id, csr=make_csr(key, client_id).decode(), domain="legal")
    return Sender(device=enrollment.device, api_token=enrollment.api_token, signing_key=key)


def adapters_for(shapes: dict[str, tuple[int, int, int]], seed: int) -> dict[str, torch.Tensor]:
    """Small random LoRA factors for expert 1 of every adapted parameter, under fednested's wire names."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for param, (_, out_features, in_features) in sorted(shapes.items()):
        tensors[adapter_key(param, 1, "lora_A")] = torch.randn(ADAPTER.rank, in_features, generator=generator) * 0.01
        tensors[adapter_key(param, 1, "lora_B")] = torch.randn(out_features, ADAPTER.rank, generator=generator) * 0.01
    return tensors


def store_payload(plane: ControlPlane, sender: Sender, update_id: str, raw: bytes) -> dict[str, Any]:
    """Upload payload bytes as the sender's device does and return the claim check an envelope carries."""
    receipt = store_update_payload(
        sender.device,
        update_id,
        io.BytesIO(raw),
        declared_sha256=hashlib.sha256(raw).hexdigest(),
        content_length=len(raw),
        max_bytes=len(raw),
        root=plane.artifacts,
    )
    return {"uri": receipt.uri, "sha256": receipt.sha256, "size_bytes": receipt.bytes}


def envelope(
    sender: Sender, payload: dict[str, Any], *, base_version: str, round_id: str | None, update_id: str
) -> UpdateEnvelope:
    unsigned = UpdateEnvelope.model_validate(
        {
            "schema": "UpdateEnvelope",
            "schema_version": 1,
            "update_id": update_id,
            "client_id": sender.device.client_id,
            "base_version": base_version,
            "round_id": round_id,
            "examples": 16,
            "routed_tokens": {"0.1": 40, "1.1": 25},
            "metrics": {"train_loss": 2.5, "tokens": 64.0},
            "payload": payload,
            "adapter": {"rank": ADAPTER.rank, "alpha": ADAPTER.alpha, "target_modules": list(ADAPTER.targets)},
            "created_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
        },
        strict=False,
    )
    return unsigned.signed(sender.signing_key)


def test_bad_input_is_rejected_with_reasons_in_api_and_console_and_nothing_valid_is_lost(
    control_plane: ControlPlane, first_version_template: Path
) -> None:
    plane = control_plane
    v1 = install_champion(plane, first_version_template)
    shapes = expert_param_shapes(build_model("tiny", vocab_size=v1.manifest["architecture"]["config"]["vocab_size"]))
    good, spare, revoked = enroll(plane, "edge-good"), enroll(plane, "edge-spare"), enroll(plane, "edge-revoked")
    revoke_device(revoked.device, actor=plane.engineer, reason="lost in transit")
    # K is larger than what arrives, so nothing is aggregated: the test looks at ingestion alone. The round's limits
    # make a 1-version-old base too stale and cap payloads at 64 KiB.
    strict_round = open_round(
        base_version=v1,
        buffer_size_k=50,
        deadline_at=timezone.now() + timedelta(hours=1),
        actor=plane.engineer,
        round_id="e2e-bad-input",
        config={"max_staleness": 4, "max_payload_bytes": 64 * 1024},
    )
    no_staleness_round = open_round(
        base_version=v1,
        buffer_size_k=50,
        deadline_at=timezone.now() + timedelta(hours=1),
        actor=plane.engineer,
        round_id="e2e-no-staleness",
        config={"max_staleness": 0},
    )
    promote_child(plane, v1, "v2")  # v1 is now one version behind the champion
    ingest = plane.start_ingest_worker()
    valid = save_safetensors(adapters_for(shapes, seed=1))

    def publish(event: UpdateEnvelope) -> None:
        # What an enrolled device may do on Kafka (its certificate): the hostile input comes from inside the ACLs.
        with make_bus(plane.device_bus_settings) as bus:
            bus.publish(Topic.UPDATES, event, key=event.client_id)

    def publish_raw(raw: bytes, key: str) -> None:
        settings = plane.device_bus_settings
        producer = Producer({"bootstrap.servers": settings.bootstrap_servers, **settings.tls_properties()})
        producer.produce(settings.topics.physical_name(Topic.UPDATES), value=raw, key=key)
        assert producer.flush(15) == 0

    def valid_update(sender: Sender, seed: int) -> UpdateEnvelope:
        update_id = str(uuid.uuid4())
        raw = save_safetensors(adapters_for(shapes, seed=seed))
        return envelope(
            sender,
            store_payload(plane, sender, update_id, raw),
            base_version="v1",
            round_id=strict_round.round_id,
            update_id=update_id,
        )

    def bad_payload(tensors: dict[str, torch.Tensor]) -> UpdateEnvelope:
        update_id = str(uuid.uuid4())
        raw = save_safetensors({key: value.contiguous() for key, value in tensors.items()})
        return envelope(
            good,
            store_payload(plane, good, update_id, raw),
            base_version="v1",
            round_id=strict_round.round_id,
            update_id=update_id,
        )

    first_valid = valid_update(good, seed=1)
    publish(first_valid)
    rejected_expected: dict[str, str] = {}
    refused_expected: list[str] = []

    # sha256 mismatch: the stored bytes are not what the envelope claims.
    update_id = str(uuid.uuid4())
    claim = store_payload(plane, good, update_id, valid)
    artifact_path(claim["uri"], plane.artifacts).write_bytes(valid[:-8] + b"\x00" * 8)
    tampered = envelope(good, claim, base_version="v1", round_id=strict_round.round_id, update_id=update_id)
    publish(tampered)
    rejected_expected[str(tampered.update_id)] = "sha256_mismatch"
    # Too stale: the round allows no staleness, and its base is one version behind the champion by now.
    update_id = str(uuid.uuid4())
    event = envelope(
        good,
        store_payload(plane, good, update_id, valid),
        base_version="v1",
        round_id=no_staleness_round.round_id,
        update_id=update_id,
    )
    publish(event)
    rejected_expected[str(event.update_id)] = "too_stale"
    # NaN and Inf in a tensor.
    poisoned = adapters_for(shapes, seed=2)
    first_key = sorted(poisoned)[0]
    poisoned[first_key][0, 0] = float("nan")
    poisoned[sorted(poisoned)[1]][0, 0] = float("inf")
    event = bad_payload(poisoned)
    publish(event)
    rejected_expected[str(event.update_id)] = "non_finite"
    # A tensor name no adapter has (a base weight smuggled in).
    smuggled = adapters_for(shapes, seed=3) | {"model.embed_tokens.weight": torch.zeros(4, 4)}
    event = bad_payload(smuggled)
    publish(event)
    rejected_expected[str(event.update_id)] = "bad_tensor_names"
    # Right names, wrong shapes.
    misshapen = {
        key: torch.zeros(value.shape[0] + 1, value.shape[1]) for key, value in adapters_for(shapes, seed=4).items()
    }
    event = bad_payload(misshapen)
    publish(event)
    rejected_expected[str(event.update_id)] = "bad_shapes"
    # Over the round's payload limit.
    oversized = {
        key: value.repeat(1, 40) if "lora_A" in key else value for key, value in adapters_for(shapes, seed=5).items()
    }
    event = bad_payload(oversized)
    publish(event)
    rejected_expected[str(event.update_id)] = "oversized"
    # Refused without a row: malformed JSON, a schema violation, strangers, unknown base, and a replay.
    publish_raw(b'{"schema": "UpdateEnvelope", "schema_version": 1, "update_id": ', key=good.device.client_id)
    refused_expected.append("malformed")
    broken = json.loads(first_valid.model_dump_json())
    del broken["payload"]
    publish_raw(json.dumps(broken).encode(), key=good.device.client_id)
    refused_expected.append("malformed")
    stranger = Sender(
        device=EdgeDevice(client_id="edge-stranger"),
        api_token="fna_not-a-real-token",
        signing_key=generate_private_key(),
    )
    publish(envelope(stranger, claim, base_version="v1", round_id=None, update_id=str(uuid.uuid4())))
    refused_expected.append("unknown_client")
    publish(envelope(revoked, claim, base_version="v1", round_id=None, update_id=str(uuid.uuid4())))
    refused_expected.append("revoked_client")
    update_id = str(uuid.uuid4())
    unknown_base = store_payload(plane, good, update_id, valid)
    publish(envelope(good, unknown_base, base_version="v9", round_id=None, update_id=update_id))
    refused_expected.append("unknown_base_version")
    # The same envelope again is a duplicate (recorded, nothing changes); another envelope under its id is a replay.
    publish(first_valid)
    publish(first_valid.model_copy(update={"examples": first_valid.examples + 1}).signed(good.signing_key))
    refused_expected.append("replayed")
    # And a valid update after all of that, from another device: it must be buffered like the first.
    last_valid = valid_update(spare, seed=6)
    publish(last_valid)

    def settled() -> bool | None:
        done = (
            Update.objects.filter(
                update_id__in=[str(first_valid.update_id), str(last_valid.update_id)], status=UpdateStatus.BUFFERED
            ).count()
            == 2
        )
        rejected = Update.objects.filter(status=UpdateStatus.REJECTED).count() == len(rejected_expected)
        refused = AuditEvent.objects.filter(verb="federation.update.refused").count() == len(refused_expected)
        resent = AuditEvent.objects.filter(verb="federation.update.resent").count() == 1
        return True if done and rejected and refused and resent else None

    plane.wait_for("every envelope to be handled", settled, timeout_s=300)
    assert ingest.running, "the ingest worker stopped on bad input"

    api = plane.api()
    rows = api.get("/api/v1/updates/", {"status": "rejected"}).json()
    rows = rows["results"] if isinstance(rows, dict) else rows
    assert {row["update_id"]: row["rejection"]["code"] for row in rows} == rejected_expected
    assert all(row["rejection"]["message"] for row in rows)
    buffered = api.get("/api/v1/updates/", {"status": "buffered"}).json()
    buffered = buffered["results"] if isinstance(buffered, dict) else buffered
    assert {row["update_id"] for row in buffered} == {str(first_valid.update_id), str(last_valid.update_id)}
    refusals = api.get("/api/v1/audit-events/", {"verb": "federation.update.refused"}).json()
    refusals = refusals["results"] if isinstance(refusals, dict) else refusals
    assert sorted(event["data"]["code"] for event in refusals) == sorted(refused_expected)

    console = Client()
    console.force_login(plane.officer)
    page = console.get("/updates/", {"status": "rejected"}).content.decode()
    for code in rejected_expected.values():
        assert f"<code>{code}</code>" in page
    audit = console.get("/audit/", {"verb": "refused"}).content.decode()
    for code in set(refused_expected):
        assert f"code={code}" in audit
    # Still working: one more valid update is buffered after all the bad ones.
    straggler = valid_update(spare, seed=7)
    publish(straggler)
    plane.wait_for(
        "the worker to buffer an update after the bad ones",
        lambda: Update.objects.filter(update_id=str(straggler.update_id), status=UpdateStatus.BUFFERED).first(),
        timeout_s=120,
    )
