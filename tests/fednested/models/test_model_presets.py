"""Presets, families, local loading and fingerprints of fednested.models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from fednested.models import (
    FAMILIES,
    PRESETS,
    ModelNotFoundError,
    UnknownPresetError,
    build_config,
    build_model,
    count_parameters,
    load_model,
    model_fingerprint,
    save_model,
)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    # the test machines share a few cores between many processes; one thread avoids oversubscription stalls
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def meta_parameter_counts(preset: str, family: str) -> tuple[int, int]:
    """(total, expert) parameter counts without allocating weights."""
    config = build_config(preset, family)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = count_parameters(model)
    experts = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    return total, experts


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_preset_is_a_few_million_parameters_and_runs(family: str) -> None:
    model = build_model("tiny", family)
    assert model.config.model_type == family
    assert 1_000_000 <= count_parameters(model) <= 5_000_000
    ids = torch.randint(0, 4096, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 8, 4096)
    assert torch.isfinite(logits).all()
    assert not model.training


@pytest.mark.parametrize("family", FAMILIES)
def test_small_preset_is_50_to_100m_parameters_dominated_by_experts(family: str) -> None:
    total, experts = meta_parameter_counts("small", family)
    assert 50_000_000 <= total <= 100_000_000
    assert experts / total >= 0.8


@pytest.mark.parametrize("family", FAMILIES)
def test_medium_preset_is_over_400m_parameters_even_with_the_benchmark_vocabulary(family: str) -> None:
    # the edge benchmark builds it with its own 2,041-token tokenizer; weights must still dominate the process
    config = build_config("medium", family, vocab_size=2041)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = count_parameters(model)
    experts = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    assert 400_000_000 <= total <= 500_000_000
    assert experts / total >= 0.85


def test_presets_cover_tiny_small_and_medium() -> None:
    assert {"tiny", "small", "medium"} <= set(PRESETS)


def test_same_seed_gives_bitwise_same_weights_other_seed_differs() -> None:
    first = build_model("tiny", "mixtral", seed=7)
    again = build_model("tiny", "mixtral", seed=7)
    other = build_model("tiny", "mixtral", seed=8)
    assert model_fingerprint(first) == model_fingerprint(again)
    assert model_fingerprint(first) != model_fingerprint(other)


def test_building_a_model_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model("tiny", "qwen2_moe", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_vocab_size_overrides_the_preset() -> None:
    model = build_model("tiny", "qwen2_moe", vocab_size=300)
    assert model.config.vocab_size == 300
    assert model.get_input_embeddings().weight.shape == (300, 128)


def test_unknown_preset_and_family_are_refused_with_the_choices() -> None:
    with pytest.raises(UnknownPresetError, match=r"unknown model preset 'huge'.*\['medium', 'small', 'tiny'\]"):
        build_model("huge")
    with pytest.raises(UnknownPresetError, match=r"unknown model family 'gpt2'.*mixtral"):
        build_model("tiny", "gpt2")
    with pytest.raises(ValueError, match="vocab_size must be positive"):
        build_config("tiny", vocab_size=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip_is_bitwise(tmp_path: Path, family: str) -> None:
    model = build_model("tiny", family, seed=2)
    save_model(model, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert type(loaded) is type(model)
    assert model_fingerprint(loaded) == model_fingerprint(model)
    assert load_model(tmp_path / "model", dtype=torch.bfloat16).model.embed_tokens.weight.dtype == torch.bfloat16


def test_missing_model_directory_says_where_and_what_to_do(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelNotFoundError, match=rf"{missing} does not exist.*build_model"):
        load_model(missing)


def test_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"config\.json is missing"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="no weights"):
        load_model(tmp_path)
    a_file = tmp_path / "config.json"
    with pytest.raises(ModelNotFoundError, match="is a file"):
        load_model(a_file)


def test_other_architectures_are_refused(tmp_path: Path) -> None:
    llama = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            vocab_size=50,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    llama.save_pretrained(tmp_path / "llama")
    with pytest.raises(UnknownPresetError, match="'llama' is not a supported MoE family"):
        load_model(tmp_path / "llama")
