"""Importing Hugging Face MoE checkpoint directories: sharded and single-file, hub and fused layouts, bit for bit,
and a named error for each bad directory (missing shard, wrong shapes, other architecture, dangling index entry)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from fednested.checkpoints import CheckpointError, load_version, verify_version
from fednested.checkpoints.hf_import import INDEX_NAME, import_hf_checkpoint, inspect_hf_checkpoint
from fednested.models import build_model

VOCAB = 96


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def save_sharded(model: PreTrainedModel, directory: Path) -> list[str]:
    """save_pretrained with shards small enough that the tiny model spreads over several files; returns them."""
    model.save_pretrained(directory, max_shard_size="200KB")
    shards = sorted(path.name for path in directory.glob("model-*.safetensors"))
    assert len(shards) > 2
    assert (directory / INDEX_NAME).is_file()
    return shards


def assert_same_weights(model: PreTrainedModel, version: Path) -> None:
    loaded, _ = load_version(version)
    expected, actual = model.state_dict(), loaded.state_dict()
    assert sorted(expected) == sorted(actual)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_sharded_hub_layout_imports_bit_for_bit(tmp_path: Path, family: str) -> None:
    model = build_model("tiny", family, vocab_size=VOCAB, seed=3)
    source = tmp_path / f"hf-{family}"
    shards = save_sharded(model, source)
    # the hub layout stores one tensor per expert and projection, not transformers' fused 3-D tensors
    index = json.loads((source / INDEX_NAME).read_text())
    assert not any(name.endswith("experts.gate_up_proj") for name in index["weight_map"])
    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]"))).save_pretrained(source)

    manifest = import_hf_checkpoint(source, tmp_path / "version", version_id="imported-1")

    assert manifest.version_id == "imported-1"
    assert manifest.parent_version is None
    assert manifest.lineage["imported_from"]["files"] == shards
    assert manifest.architecture["family"] == family
    assert {"core.safetensors", "experts.safetensors", "gate.safetensors", "tokenizer.json"} <= set(manifest.files)
    assert verify_version(tmp_path / "version").version_id == "imported-1"
    assert_same_weights(model, tmp_path / "version")


def test_single_file_in_fused_layout_imports(tmp_path: Path) -> None:
    model = build_model("tiny", "mixtral", vocab_size=VOCAB, seed=4)
    source = tmp_path / "fused"
    source.mkdir()
    (source / "config.json").write_text(model.config.to_json_string(), encoding="utf-8")
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, source / "model.safetensors")

    manifest = import_hf_checkpoint(source, tmp_path / "version")

    assert manifest.version_id == "hf-fused"
    assert "tokenizer.json" not in manifest.files
    assert_same_weights(model, tmp_path / "version")


@pytest.fixture
def sharded(tmp_path: Path) -> tuple[Path, list[str]]:
    source = tmp_path / "hf"
    return source, save_sharded(build_model("tiny", "mixtral", vocab_size=VOCAB, seed=5), source)


def refused(source: Path) -> CheckpointError:
    with pytest.raises(CheckpointError) as caught:
        inspect_hf_checkpoint(source)
    return caught.value


def test_missing_shard_is_named(sharded: tuple[Path, list[str]]) -> None:
    source, shards = sharded
    (source / shards[1]).unlink()
    error = refused(source)
    assert error.reason == "missing"
    assert error.path == source / shards[1]
    assert INDEX_NAME in str(error)


def test_shard_with_tensor_of_wrong_shape_is_named(sharded: tuple[Path, list[str]]) -> None:
    source, _ = sharded
    weight_map = json.loads((source / INDEX_NAME).read_text())["weight_map"]
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    shard = source / weight_map[name]
    tensors = load_file(shard)
    tensors[name] = tensors[name][:-1].contiguous()  # one row short of the config's intermediate_size
    save_file(tensors, shard, metadata={"format": "pt"})
    error = refused(source)
    assert error.reason == "other shapes"
    assert error.path == shard
    assert name in str(error)
    assert "[255, 128]" in str(error)
    assert "[256, 128]" in str(error)


def test_shard_with_other_dtype_than_config_is_named(sharded: tuple[Path, list[str]]) -> None:
    source, _ = sharded
    weight_map = json.loads((source / INDEX_NAME).read_text())["weight_map"]
    name = "model.embed_tokens.weight"
    tensors = load_file(source / weight_map[name])
    tensors[name] = tensors[name].to(torch.bfloat16)
    save_file(tensors, source / weight_map[name], metadata={"format": "pt"})
    error = refused(source)
    assert error.reason == "other shapes"
    assert name in str(error)
    assert "bfloat16" in str(error)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "'LlamaForCausalLM' is not supported"),
        ({"architectures": None, "model_type": "llama"}, "'llama' is not a supported MoE family"),
        ({"architectures": ["Qwen2MoeForCausalLM"]}, "does not fit model_type 'mixtral'"),
    ],
)
def test_unsupported_architecture_is_refused(
    sharded: tuple[Path, list[str]], edit: dict[str, object], expected: str
) -> None:
    source, _ = sharded
    config = json.loads((source / "config.json").read_text()) | edit
    (source / "config.json").write_text(json.dumps(config))
    error = refused(source)
    assert error.reason == "other architecture"
    assert error.path == source / "config.json"
    assert expected in str(error)


def test_index_naming_a_tensor_no_shard_has_is_named(sharded: tuple[Path, list[str]]) -> None:
    source, shards = sharded
    index = json.loads((source / INDEX_NAME).read_text())
    index["weight_map"]["model.layers.0.block_sparse_moe.experts.9.w1.weight"] = shards[0]
    (source / INDEX_NAME).write_text(json.dumps(index))
    error = refused(source)
    assert error.reason == "missing"
    assert error.path == source / shards[0]
    assert "'model.layers.0.block_sparse_moe.experts.9.w1.weight'" in str(error)


def test_tensor_missing_from_every_shard_is_named(sharded: tuple[Path, list[str]]) -> None:
    source, _ = sharded
    index = json.loads((source / INDEX_NAME).read_text())
    name = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    shard = source / index["weight_map"].pop(name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    (source / INDEX_NAME).write_text(json.dumps(index))
    error = refused(source)
    assert error.reason == "missing"
    assert f"no shard holds tensor {name!r}" in str(error)


def test_shard_holding_a_tensor_the_index_puts_elsewhere_is_named(sharded: tuple[Path, list[str]]) -> None:
    source, shards = sharded
    weight_map = json.loads((source / INDEX_NAME).read_text())["weight_map"]
    name = "model.norm.weight"
    other = source / next(shard for shard in shards if shard != weight_map[name])
    tensors = load_file(other)
    tensors[name] = torch.zeros(128)  # a second copy: which one the model would get is undefined
    save_file(tensors, other, metadata={"format": "pt"})
    error = refused(source)
    assert error.reason == "invalid"
    assert error.path == other
    assert f"holds tensor {name!r}, which {INDEX_NAME} does not list here" in str(error)
