"""Pulling the champion: every file is checked against the manifest, the manifest against the API's sha256; a
corrupt download is discarded and retried, a version that never verifies is never stored or loaded."""

import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from edge_client.sidecar import AuditLog, Sidecar, example_policy, load_policy
from edge_client.snapshots import SnapshotError, load_base, pull_champion
from edge_client.state import StateDir
from edge_client.transport.http import ControlPlaneClient
from edge_client.transport.retry import RetriesExhausted, RetryPolicy
from fednested.checkpoints import load_version
from fednested.quantization import model_memory_bytes, quantized_bits

RETRY = RetryPolicy(initial_delay_s=0.0, max_delay_s=0.0, max_attempts=3)


@pytest.fixture
def device(tmp_path: Path, control_plane: Any, kit: Any) -> Any:
    control_plane.add_version(kit.assets.v1)
    control_plane.champion = "v1"
    token = control_plane.issue_token()
    control_plane.enrollment_tokens[token] = "used"
    api_token = "fna_test-device"
    control_plane.api_tokens[api_token] = "edge-1"
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(example_policy(control_plane.url)))
    sidecar = Sidecar(load_policy(policy), AuditLog(tmp_path / "audit.jsonl"))
    api = ControlPlaneClient(control_plane.url, sidecar, api_token=api_token)
    yield api, StateDir(tmp_path / "state")
    api.close()


def _pull(api: ControlPlaneClient, state: StateDir) -> Any:
    return pull_champion(api, state, RETRY, rng=random.Random(0), sleep=lambda _: None)


def test_pull_verifies_and_loads_the_champion(device: Any, kit: Any) -> None:
    api, state = device
    pulled = _pull(api, state)
    assert pulled.version_id == "v1"
    assert pulled.directory == state.root / "versions" / "v1"
    base = load_base(pulled)
    reference, _ = load_version(kit.assets.v1)
    for (name, tensor), (_, expected) in zip(
        base.model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(tensor, expected), name
    # A second pull finds the verified copy and downloads nothing.
    before = len(api.sidecar.audit.path.read_text().splitlines())
    assert _pull(api, state).directory == pulled.directory
    after = api.sidecar.audit.path.read_text().splitlines()
    assert sum('"artifact.get"' in line for line in after[before:]) == 0


def test_corrupt_downloads_are_discarded_and_retried(device: Any, control_plane: Any) -> None:
    api, state = device
    control_plane.corrupt_downloads = 2
    pulled = _pull(api, state)
    assert pulled.version_id == "v1"
    assert control_plane.corrupt_downloads == 0
    retries = [line for line in api.sidecar.audit.path.read_text().splitlines() if '"snapshot.retry"' in line]
    assert len(retries) == 2
    assert "does not match the expected" in retries[0]
    assert not list(state.versions_dir.glob(".partial-*"))


def test_a_file_that_never_verifies_is_never_stored(device: Any, control_plane: Any) -> None:
    api, state = device
    control_plane.corrupt_downloads = 100
    with pytest.raises(RetriesExhausted, match=r"sha256 .* does not match"):
        _pull(api, state)
    assert not (state.versions_dir / "v1").exists()
    assert not list(state.versions_dir.glob(".partial-*"))
    assert not list(state.versions_dir.rglob("*.safetensors"))


def test_manifest_that_does_not_match_the_api_sha256_is_rejected(device: Any, control_plane: Any) -> None:
    api, state = device
    control_plane.wrong_manifest_sha256 = True
    with pytest.raises(RetriesExhausted, match=r"manifest\.json.*does not match the expected 0{64}"):
        _pull(api, state)
    assert not (state.versions_dir / "v1").exists()


def test_api_file_list_that_disagrees_with_the_manifest_is_rejected(device: Any, control_plane: Any) -> None:
    api, state = device
    info = api.champion()
    tampered = info.__class__(
        version_id=info.version_id,
        parent_version=info.parent_version,
        manifest_sha256=info.manifest_sha256,
        manifest_url=info.manifest_url,
        files=tuple(ref.__class__(ref.name, "f" * 64, ref.bytes, ref.url) for ref in info.files),
    )
    with pytest.raises(SnapshotError, match="disagrees with its manifest"):
        pull_champion(api, state, RETRY, info=tampered, sleep=lambda _: None)
    assert not (state.versions_dir / "v1").exists()


def test_tampered_copy_on_disk_is_replaced_not_used(device: Any) -> None:
    api, state = device
    pulled = _pull(api, state)
    experts = pulled.directory / "experts.safetensors"
    data = bytearray(experts.read_bytes())
    data[-1] ^= 0x01
    experts.write_bytes(bytes(data))
    again = _pull(api, state)
    assert again.directory == pulled.directory
    load_base(again)  # verifies every sha256 again before loading


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base_loads(device: Any, bits: int) -> None:
    api, state = device
    pulled = _pull(api, state)
    full = load_base(pulled)
    base = load_base(pulled, quantize_bits=bits)  # type: ignore[arg-type]
    assert quantized_bits(base.model) == bits
    assert not any(parameter.requires_grad for parameter in base.model.parameters())
    assert model_memory_bytes(base.model) < 0.6 * model_memory_bytes(full.model)
