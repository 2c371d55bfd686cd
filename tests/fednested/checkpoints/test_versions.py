"""Model versions on disk: split safetensors + manifest, bitwise round trip, and a named error for each bad input."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from fednested.checkpoints import (
    MANIFEST_NAME,
    CheckpointError,
    FileEntry,
    Manifest,
    file_sha256,
    load_version,
    read_manifest,
    save_version,
    verify_version,
)
from fednested.models import FAMILIES, build_model, model_fingerprint
from fednested.partition import partition_model


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    directory = tmp_path / "v1"
    save_version(build_model("tiny", "mixtral", seed=1), directory, version_id="v1", parent_version=None)
    return directory


def reseal(directory: Path, name: str) -> None:
    """Record a tampered file's new sha256/size in the manifest, so checks past the checksum are reached."""
    manifest = read_manifest(directory)
    entry = manifest.files[name]
    manifest.files[name] = FileEntry(file_sha256(directory / name), (directory / name).stat().st_size, entry.partition)
    (directory / MANIFEST_NAME).write_text(manifest.to_json())


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bitwise_with_files_split_by_partition(tmp_path: Path, family: str) -> None:
    model = build_model("tiny", family, seed=4)
    directory = tmp_path / "v2"
    manifest = save_version(
        model, directory, version_id="v2", parent_version="v1", lineage={"datasets": ["corpus-a"], "runs": ["r7"]}
    )
    assert sorted(p.name for p in directory.iterdir()) == [
        "config.json",
        "core.safetensors",
        "experts.safetensors",
        "gate.safetensors",
        "manifest.json",
    ]
    partition = partition_model(model)
    for name, kind in (("core.safetensors", "core"), ("experts.safetensors", "expert"), ("gate.safetensors", "gate")):
        with safe_open(str(directory / name), framework="pt") as handle:
            assert sorted(handle.keys()) == partition.names_of_kind(kind)
        assert manifest.files[name].sha256 == file_sha256(directory / name)
        assert manifest.files[name].bytes == (directory / name).stat().st_size
    loaded, read_back = load_version(directory, expected_version="v2")
    assert model_fingerprint(loaded) == model_fingerprint(model)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a, b), name
    assert read_back.to_dict() == manifest.to_dict()
    assert read_back.parent_version == "v1"
    assert read_back.lineage == {"datasets": ["corpus-a"], "runs": ["r7"]}
    assert read_back.partition == partition
    assert read_back.architecture["family"] == family
    ids = torch.randint(0, 4096, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_bf16_weights_keep_their_dtype_bit_for_bit(tmp_path: Path) -> None:
    model = build_model("tiny", "qwen2_moe").to(torch.bfloat16)
    save_version(model, tmp_path / "bf16", version_id="bf16", parent_version=None)
    loaded, _ = load_version(tmp_path / "bf16")
    assert loaded.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert model_fingerprint(loaded) == model_fingerprint(model)


def test_tokenizer_files_are_part_of_the_version(tmp_path: Path) -> None:
    tokenizer = Tokenizer(WordLevel({"[UNK]": 0, "brake": 1, "pad": 2}, unk_token="[UNK]"))
    manifest = save_version(build_model(), tmp_path / "v", version_id="v", parent_version=None, tokenizer=tokenizer)
    assert manifest.files["tokenizer.json"].partition == "tokenizer"
    assert Tokenizer.from_file(str(tmp_path / "v" / "tokenizer.json")).token_to_id("brake") == 1
    verify_version(tmp_path / "v")


def test_safeguard_files_ship_with_the_version_and_are_verified(tmp_path: Path) -> None:
    replay = tmp_path / "public.jsonl"
    replay.write_text('{"text": "a public sentence"}\n')
    model = build_model()
    manifest = save_version(
        model, tmp_path / "v", version_id="v", parent_version=None, safeguard_files={"replay.jsonl": replay}
    )
    assert manifest.files["replay.jsonl"] == FileEntry(file_sha256(replay), replay.stat().st_size, "safeguards")
    assert read_manifest(tmp_path / "v").files["replay.jsonl"].partition == "safeguards"
    verify_version(tmp_path / "v")
    (tmp_path / "v" / "replay.jsonl").write_text('{"text": "a public sentencE"}\n')
    with pytest.raises(CheckpointError, match=r"replay\.jsonl.*sha256 mismatch"):
        verify_version(tmp_path / "v")
    for name in ("experts.safetensors", "config.json", "../escape", ".hidden"):
        with pytest.raises(CheckpointError, match="a safeguard file needs a plain name of its own"):
            save_version(model, tmp_path / "w", version_id="w", parent_version=None, safeguard_files={name: replay})
    assert not (tmp_path / "w").exists()


def test_manifest_json_round_trip() -> None:
    manifest = Manifest(
        version_id="v9",
        kind="version",
        parent_version="v8",
        architecture={"family": "mixtral", "id": "abc"},
        files={"core.safetensors": FileEntry("00" * 32, 10, "core")},
        partition=partition_model(build_model()),
        lineage={"updates": ["u1"]},
        created_at="2026-01-01T00:00:00Z",
    )
    assert Manifest.from_json(manifest.to_json()).to_dict() == manifest.to_dict()


def test_corrupt_file_fails_its_sha256_check(saved: Path) -> None:
    path = saved / "experts.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"experts\.safetensors: sha256 mismatch") as caught:
        load_version(saved)
    assert caught.value.path == path
    assert caught.value.reason == "sha256 mismatch"


def test_truncated_file_is_reported_as_truncated(saved: Path) -> None:
    path = saved / "core.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"core\.safetensors: truncated: 1000 bytes, manifest\.json records \d+"):
        verify_version(saved)


def test_missing_file_is_reported_as_missing(saved: Path) -> None:
    (saved / "gate.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"gate\.safetensors: missing") as caught:
        load_version(saved)
    assert caught.value.reason == "missing"
    shutil.rmtree(saved)
    with pytest.raises(CheckpointError, match=r"manifest\.json: missing"):
        load_version(saved)


def test_corrupt_manifest_and_unreadable_tensor_file(saved: Path) -> None:
    (saved / "experts.safetensors").write_bytes(b"\xff" * 64)
    reseal(saved, "experts.safetensors")
    with pytest.raises(CheckpointError, match=r"experts\.safetensors: corrupt: unreadable safetensors file"):
        load_version(saved)
    (saved / MANIFEST_NAME).write_text('{"format_version": 1,')
    with pytest.raises(CheckpointError, match=r"manifest\.json: corrupt: not valid JSON \(line 1"):
        load_version(saved)
    (saved / MANIFEST_NAME).write_text(json.dumps({"format_version": 1, "kind": "version"}))
    with pytest.raises(CheckpointError, match="corrupt: field 'files' is missing"):
        load_version(saved)


def test_other_architecture_is_refused(saved: Path, tmp_path: Path) -> None:
    save_version(build_model("tiny", "qwen2_moe"), tmp_path / "qwen", version_id="q", parent_version=None)
    shutil.copy(tmp_path / "qwen" / "config.json", saved / "config.json")
    reseal(saved, "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json: other architecture: config\.json describes qwen2_moe"):
        load_version(saved)


def test_other_shapes_are_refused_naming_the_file_and_tensor(saved: Path, tmp_path: Path) -> None:
    wider = build_model("tiny", "mixtral")
    wider.model.layers[0].mlp.experts.down_proj = torch.nn.Parameter(torch.zeros(4, 128, 300))
    save_version(wider, tmp_path / "wider", version_id="w", parent_version=None)
    shutil.copy(tmp_path / "wider" / "experts.safetensors", saved / "experts.safetensors")
    reseal(saved, "experts.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"experts\.safetensors: other shapes: tensor 'model\.layers\.0\.mlp\.experts\.down_proj' has shape "
        r"\[4, 128, 300\], the config needs \[4, 128, 256\]",
    ):
        load_version(saved)


def test_other_version_and_existing_directory(saved: Path) -> None:
    with pytest.raises(CheckpointError, match="other version: holds 'v1', expected 'v2'"):
        load_version(saved, expected_version="v2")
    with pytest.raises(CheckpointError, match="exists: a version directory is immutable"):
        save_version(build_model(), saved, version_id="v1b", parent_version="v1")
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".v1")], "no staging directory left behind"


def test_a_config_the_manifest_does_not_list_is_never_loaded(saved: Path) -> None:
    manifest_path = saved / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["files"]["config.json"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"config\.json: missing: not listed in manifest\.json"):
        load_version(saved)
