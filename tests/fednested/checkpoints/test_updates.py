"""Adapter updates on disk: bitwise round trip, and named errors for bad files, bases, architectures and shapes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fednested.adapters import ExpertLoraConfig, adapter_state_dict, attach_expert_adapters
from fednested.checkpoints import (
    ADAPTERS_NAME,
    MANIFEST_NAME,
    CheckpointError,
    Manifest,
    load_update,
    save_update,
    save_version,
)
from fednested.models import build_model

CONFIG = ExpertLoraConfig(rank=2, alpha=4, experts=[1, 2])


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def base(tmp_path: Path) -> Manifest:
    return save_version(build_model("tiny", "mixtral"), tmp_path / "base", version_id="v1", parent_version=None)


def adapters_for(family: str = "mixtral", config: ExpertLoraConfig = CONFIG) -> dict[str, torch.Tensor]:
    state = adapter_state_dict(attach_expert_adapters(build_model("tiny", family), config))
    # non-zero B so the round trip is not trivially all zeros
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=generator) if k.endswith("lora_B") else v for k, v in state.items()}


def test_update_round_trip_is_bitwise(tmp_path: Path, base: Manifest) -> None:
    adapters = adapters_for()
    manifest = save_update(
        adapters,
        tmp_path / "u1",
        base_version="v1",
        adapter_config=CONFIG,
        metadata={"client_id": "car-7"},
        base_manifest=base,
    )
    assert sorted(p.name for p in (tmp_path / "u1").iterdir()) == [ADAPTERS_NAME, MANIFEST_NAME]
    assert manifest.version_id == f"update-{manifest.files[ADAPTERS_NAME].sha256[:16]}"
    loaded, config, read_back = load_update(tmp_path / "u1", base_manifest=base)
    assert config == CONFIG
    assert sorted(loaded) == sorted(adapters)
    assert all(torch.equal(loaded[k], adapters[k]) for k in adapters)
    assert read_back.base_version == "v1"
    assert read_back.metadata == {"client_id": "car-7"}
    assert read_back.architecture_id == base.architecture_id


def test_update_written_against_another_base_version_is_refused(tmp_path: Path, base: Manifest) -> None:
    save_update(adapters_for(), tmp_path / "u", base_version="v0", adapter_config=CONFIG, metadata={})
    with pytest.raises(
        CheckpointError, match=r"manifest\.json: other base version: update was trained on 'v0'"
    ) as caught:
        load_update(tmp_path / "u", base_manifest=base)
    assert caught.value.reason == "other base version"
    with pytest.raises(CheckpointError, match="other base version"):
        save_update(
            adapters_for(), tmp_path / "u2", base_version="v0", adapter_config=CONFIG, metadata={}, base_manifest=base
        )


def test_update_for_another_architecture_is_refused(tmp_path: Path, base: Manifest) -> None:
    qwen = save_version(build_model("tiny", "qwen2_moe"), tmp_path / "qwen", version_id="v1", parent_version=None)
    save_update(
        adapters_for("qwen2_moe"),
        tmp_path / "u",
        base_version="v1",
        adapter_config=CONFIG,
        metadata={},
        base_manifest=qwen,
    )
    with pytest.raises(CheckpointError, match=r"manifest\.json: other architecture: update records architecture"):
        load_update(tmp_path / "u", base_manifest=base)


def test_update_naming_tensors_the_base_lacks_is_other_architecture(tmp_path: Path, base: Manifest) -> None:
    adapters = {k.replace("layers.1.", "layers.5."): v for k, v in adapters_for().items()}
    save_update(adapters, tmp_path / "u", base_version="v1", adapter_config=CONFIG, metadata={})
    with pytest.raises(
        CheckpointError, match=r"adapters\.safetensors: other architecture: tensor 'model\.layers\.5\.mlp\.experts"
    ):
        load_update(tmp_path / "u", base_manifest=base)


def test_update_with_other_shapes_is_refused_naming_the_tensor(tmp_path: Path, base: Manifest) -> None:
    adapters = adapters_for()
    key = "model.layers.0.mlp.experts.down_proj/expert=1/lora_A"
    adapters[key] = torch.zeros(2, 300)
    save_update(adapters, tmp_path / "u", base_version="v1", adapter_config=CONFIG, metadata={})
    with pytest.raises(
        CheckpointError,
        match=r"adapters\.safetensors: other shapes: tensor "
        r"'model\.layers\.0\.mlp\.experts\.down_proj/expert=1/lora_A' has shape \[2, 300\], the base needs \[2, 256\]",
    ):
        load_update(tmp_path / "u", base_manifest=base)
    wrong_rank = adapters_for(config=ExpertLoraConfig(rank=3, experts=[1, 2]))
    with pytest.raises(CheckpointError, match="other shapes"):
        save_update(
            wrong_rank, tmp_path / "u3", base_version="v1", adapter_config=CONFIG, metadata={}, base_manifest=base
        )


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flip", r"adapters\.safetensors: sha256 mismatch"),
        ("truncate", r"adapters\.safetensors: truncated"),
        ("delete", r"adapters\.safetensors: missing"),
        ("manifest", r"manifest\.json: corrupt"),
    ],
)
def test_damaged_update_files_are_named(tmp_path: Path, base: Manifest, damage: str, message: str) -> None:
    directory = tmp_path / "u"
    save_update(adapters_for(), directory, base_version="v1", adapter_config=CONFIG, metadata={})
    path = directory / ADAPTERS_NAME
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "delete":
        path.unlink()
    else:
        (directory / MANIFEST_NAME).write_text("not json")
    with pytest.raises(CheckpointError, match=message):
        load_update(directory, base_manifest=base)


def test_invalid_adapters_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    adapters = adapters_for()
    del adapters["model.layers.0.mlp.experts.gate_up_proj/expert=2/lora_B"]
    with pytest.raises(
        CheckpointError, match=r"'model\.layers\.0\.mlp\.experts\.gate_up_proj/expert=2/lora_B' is missing"
    ):
        save_update(adapters, tmp_path / "u", base_version="v1", adapter_config=CONFIG, metadata={})
    nan = {
        **adapters_for(),
        "model.layers.0.mlp.experts.gate_up_proj/expert=1/lora_A": torch.full((2, 128), float("nan")),
    }
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        save_update(nan, tmp_path / "u", base_version="v1", adapter_config=CONFIG, metadata={})
    assert not (tmp_path / "u").exists()
