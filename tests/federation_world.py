"""A control plane with a real tiny base version in a per-test artifact store, registered; devices whose envelopes
are signed as the edge client signs them; payloads written where the envelope's claim check points. The conftest of
each test folder that needs them imports the fixtures; tests import the helpers."""

import hashlib
import io
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from django.utils import timezone
from safetensors.torch import save as save_safetensors

from apps.accounts.choices import Role
from apps.accounts.models import User
from apps.federation.models import EdgeDevice, Round
from apps.federation.services import enroll_device, issue_enrollment_token, open_round, store_update_payload
from apps.registry.models import ModelFamily, ModelVersion
from apps.registry.services import (
    REGISTRY_PARTITIONS,
    ArtifactSpec,
    create_model_family,
    register_version,
    saved_version_artifacts,
)
from apps.registry.storage import artifact_path
from fednested.adapters.lora import ExpertLoraConfig, adapter_key
from fednested.checkpoints import Manifest, read_manifest, save_version
from fednested.data import (
    BpeTokenizerConfig,
    CorpusConfig,
    generate_corpus,
    record_texts,
    train_bpe_tokenizer,
    write_jsonl,
)
from fednested.deltas import expert_param_shapes
from fednested.identity.keys import generate_private_key, make_csr
from fednested.messaging import Topic, UpdateEnvelope
from fednested.messaging.bus import Message, read_message
from fednested.models import build_model

ADAPTER = ExpertLoraConfig(rank=2, alpha=4)
LAYER0_DOWN = "model.layers.0.mlp.experts.down_proj"
LAYER1_UP = "model.layers.1.mlp.experts.gate_up_proj"


@dataclass(frozen=True)
class BaseTemplate:
    """A saved tiny version (with tokenizer) and held-out sets, built once per session and copied per test."""

    root: Path
    shapes: dict[str, tuple[int, int, int]]


@pytest.fixture(scope="session")
def base_template(tmp_path_factory: pytest.TempPathFactory) -> BaseTemplate:
    root = tmp_path_factory.mktemp("worker-base")
    corpus = generate_corpus(CorpusConfig(seed=7, train_samples=12, heldout_samples=3))
    texts = [record for domain in corpus.values() for record in domain.records("train")]
    tokenizer = train_bpe_tokenizer(record_texts(texts), BpeTokenizerConfig(vocab_size=320))
    model = build_model("tiny", vocab_size=len(tokenizer), seed=3)
    save_version(model, root / "versions" / "v1", version_id="v1", parent_version=None, tokenizer=tokenizer)
    for domain in ("medical", "recipes"):
        write_jsonl(root / "heldout" / f"{domain}.jsonl", corpus[domain].records("heldout", "text"))
    return BaseTemplate(root=root, shapes=expert_param_shapes(model))


def registry_specs(manifest: Manifest, directory: Path | None = None) -> list[ArtifactSpec]:
    """Registry entries for every file a saved version's manifest lists, plus its manifest.json when `directory`
    holds one (as a saved version is registered)."""
    if directory is not None:
        return saved_version_artifacts(directory, manifest)
    return saved_version_artifacts_without_manifest(manifest)


def saved_version_artifacts_without_manifest(manifest: Manifest) -> list[ArtifactSpec]:
    return [
        ArtifactSpec(
            file_name=name, sha256=entry.sha256, size_bytes=entry.bytes, partition=REGISTRY_PARTITIONS[entry.partition]
        )
        for name, entry in sorted(manifest.files.items())
    ]


@dataclass
class WorkerWorld:
    """One test's control plane: artifact store, engineer, family, registered base version v1."""

    root: Path
    shapes: dict[str, tuple[int, int, int]]
    engineer: User
    family: ModelFamily
    base: ModelVersion

    def register_child(self, parent: ModelVersion, version_id: str) -> ModelVersion:
        """A registered version `version_id` whose files are the parent's (enough for lineage and staleness)."""
        manifest = Manifest.from_dict(
            {**parent.manifest, "version_id": version_id, "parent_version": parent.version_id}
        )
        return register_version(
            family=self.family,
            version_id=version_id,
            manifest=manifest.to_dict(),
            artifacts=registry_specs(manifest),
            artifact_uri=parent.artifact_uri,
            actor=self.engineer,
            parent=parent,
        )

    def open_round(
        self, *, k: int = 2, config: dict[str, Any] | None = None, deadline_in: timedelta | None = None
    ) -> Round:
        return open_round(
            base_version=self.base,
            buffer_size_k=k,
            deadline_at=timezone.now() + (deadline_in or timedelta(hours=1)),
            actor=self.engineer,
            config=config or {},
        )


@pytest.fixture
def world(db: Any, base_template: BaseTemplate, tmp_path: Path, settings: Any) -> WorkerWorld:
    root = tmp_path / "artifacts"
    shutil.copytree(base_template.root, root)
    settings.FEDNESTED_ARTIFACT_ROOT = root
    engineer = User(username="erin-engineer", role=Role.ENGINEER)
    engineer.set_unusable_password()
    engineer.save()
    family, base = register_base_version(root, engineer)
    return WorkerWorld(root=root, shapes=base_template.shapes, engineer=engineer, family=family, base=base)


def register_base_version(root: Path, engineer: User) -> tuple[ModelFamily, ModelVersion]:
    """Family tiny-moe and its version v1, registered by `engineer` from `root`/versions/v1 of the store `root`."""
    family = create_model_family(name="tiny-moe", architecture="MixtralForCausalLM", actor=engineer)
    manifest = read_manifest(root / "versions" / "v1")
    base = register_version(
        family=family,
        version_id="v1",
        manifest=manifest.to_dict(),
        artifacts=registry_specs(manifest, root / "versions" / "v1"),
        artifact_uri="artifacts://versions/v1",
        actor=engineer,
    )
    return family, base


@dataclass
class Device:
    """An enrolled device and the private key it signs envelopes with (made on the device; never sent)."""

    row: EdgeDevice
    api_token: str
    signing_key: ec.EllipticCurvePrivateKey


def enroll(world: WorkerWorld, client_id: str) -> Device:
    _, token = issue_enrollment_token(actor=world.engineer, note=client_id)
    key = generate_private_key()
    enrollment = enroll_device(
        token=token, client_id=client_id, csr=make_csr(key, client_id).decode(), domain="automotive"
    )
    return Device(row=enrollment.device, api_token=enrollment.api_token, signing_key=key)


def random_adapters(
    shapes: dict[str, tuple[int, int, int]], experts: dict[str, list[int]], seed: int
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for param, indexes in experts.items():
        _, out_features, in_features = shapes[param]
        for expert in indexes:
            tensors[adapter_key(param, expert, "lora_A")] = (
                torch.randn(ADAPTER.rank, in_features, generator=generator) * 0.1
            )
            tensors[adapter_key(param, expert, "lora_B")] = (
                torch.randn(out_features, ADAPTER.rank, generator=generator) * 0.1
            )
    return tensors


def write_payload(
    world: WorkerWorld, device: "Device", update_id: str, adapters: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Upload the adapters as a device does (the control plane's payload upload, which records the device as the
    update id's owner); returns the envelope's payload reference."""
    return write_raw_payload(
        world, device, update_id, save_safetensors({k: t.contiguous() for k, t in adapters.items()})
    )


def write_raw_payload(world: WorkerWorld, device: "Device", update_id: str, raw: bytes) -> dict[str, Any]:
    """Upload bytes as the device's payload, whatever they hold (the upload checks only size and sha256)."""
    receipt = store_update_payload(
        device.row,
        update_id,
        io.BytesIO(raw),
        declared_sha256=hashlib.sha256(raw).hexdigest(),
        content_length=len(raw),
        max_bytes=len(raw),
        root=world.root,
    )
    return {"uri": receipt.uri, "sha256": receipt.sha256, "size_bytes": receipt.bytes}


def payload_file(world: WorkerWorld, envelope: UpdateEnvelope) -> Path:
    """Where the envelope's payload lies in the test's artifact store."""
    return artifact_path(envelope.payload.uri, world.root)


def signed_envelope(
    device: Device,
    payload: dict[str, Any],
    *,
    base_version: str = "v1",
    round_id: str | None = None,
    update_id: str | None = None,
    routed_tokens: dict[str, int] | None = None,
    examples: int = 16,
    metrics: dict[str, float] | None = None,
) -> UpdateEnvelope:
    envelope = UpdateEnvelope.model_validate(
        {
            "schema": "UpdateEnvelope",
            "schema_version": 1,
            "update_id": update_id or str(uuid.uuid4()),
            "client_id": device.row.client_id,
            "base_version": base_version,
            "round_id": round_id,
            "examples": examples,
            "routed_tokens": routed_tokens if routed_tokens is not None else {"0.1": 40, "1.2": 25},
            # 64 trained tokens: the default routed counts (40 and 25, one layer each) fit top-2 routing of them.
            "metrics": metrics if metrics is not None else {"train_loss": 2.5, "tokens": 64.0},
            "payload": payload,
            "adapter": {"rank": ADAPTER.rank, "alpha": ADAPTER.alpha, "target_modules": list(ADAPTER.targets)},
            "created_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
        },
        strict=False,
    )
    return envelope.signed(device.signing_key)


_offsets = iter(range(10**9))


def as_message(raw: bytes, key: str) -> Message:
    """A record as the bus hands it to the worker (decoded and checked against the topic by the bus's own code)."""
    return read_message(Topic.UPDATES, 0, next(_offsets), key, raw, 0)


@pytest.fixture
def make_update(world: WorkerWorld) -> Callable[..., tuple[UpdateEnvelope, dict[str, torch.Tensor]]]:
    """(signed envelope, adapters) of a new valid update by `device`, its payload already in the store."""

    def build(
        device: Device, *, seed: int = 0, round_id: str | None = None, **overrides: Any
    ) -> tuple[UpdateEnvelope, dict[str, torch.Tensor]]:
        update_id = str(uuid.uuid4())
        adapters = overrides.pop("adapters", None) or random_adapters(
            world.shapes, {LAYER0_DOWN: [1], LAYER1_UP: [2]}, seed
        )
        payload = write_payload(world, device, update_id, adapters)
        return signed_envelope(device, payload, round_id=round_id, update_id=update_id, **overrides), adapters

    return build
