"""Named model sizes and MoE families, and building fresh models from them (no download, deterministic by seed)."""

# Presets are family-neutral shapes; `build_config` maps one onto the config class of each supported family.

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

Family = Literal["mixtral", "qwen2_moe"]
# Mixtral-style (routed experts only) and Qwen2-MoE (routed experts plus an always-on shared expert with its own
# sigmoid gate): two layouts that exercise the partition rules differently, both with fused 3-D expert tensors.
FAMILIES: tuple[Family, ...] = ("mixtral", "qwen2_moe")


@dataclass(frozen=True)
class ModelPreset:
    """Family-neutral shape of a MoE causal LM; `vocab_size` is a default that the tokenizer usually overrides."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    vocab_size: int
    max_positions: int = 2048
    # Qwen2-MoE only: width of the always-on shared expert.
    shared_expert_intermediate_size: int = 0


PRESETS: dict[str, ModelPreset] = {
    # About 2M parameters: fast enough for unit tests and the demo on one CPU core.
    "tiny": ModelPreset(
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        num_experts=4,
        experts_per_token=2,
        expert_intermediate_size=256,
        vocab_size=4096,
        max_positions=512,
        shared_expert_intermediate_size=128,
    ),
    # About 65M parameters (mixtral, 8192 vocab), 86% of them in the experts, so a 4-bit expert stack saves real
    # memory; used by the benchmarks.
    "small": ModelPreset(
        hidden_size=384,
        num_layers=6,
        num_heads=6,
        num_kv_heads=2,
        num_experts=8,
        experts_per_token=2,
        expert_intermediate_size=1024,
        vocab_size=8192,
        max_positions=2048,
        shared_expert_intermediate_size=512,
    ),
    # About 441M parameters (mixtral, 8192 vocab; 428M with the benchmark's 2,041-token tokenizer), 91% of them in
    # the experts: the size where weights, not the ~1 GB import baseline or activations, dominate a training
    # process, so the edge benchmark measures what a 4-bit base saves on it. Too slow for tests; memory runs only.
    "medium": ModelPreset(
        hidden_size=1024,
        num_layers=8,
        num_heads=16,
        num_kv_heads=4,
        num_experts=8,
        experts_per_token=2,
        expert_intermediate_size=2048,
        vocab_size=8192,
        max_positions=2048,
        shared_expert_intermediate_size=1024,
    ),
}


class UnknownPresetError(ValueError):
    """A preset or family name that this module does not define."""


def get_preset(name: str) -> ModelPreset:
    """The preset called `name`, or an error listing the ones that exist."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPresetError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None


def build_config(
    preset: str | ModelPreset = "tiny", family: str = "mixtral", *, vocab_size: int | None = None
) -> PretrainedConfig:
    """The transformers config of `family` with the shape of `preset` (vocab_size overrides the preset's)."""
    shape = get_preset(preset) if isinstance(preset, str) else preset
    vocab = shape.vocab_size if vocab_size is None else vocab_size
    if vocab <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab}")
    common: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "max_position_embeddings": shape.max_positions,
        "num_experts_per_tok": shape.experts_per_token,
        "tie_word_embeddings": False,
        "use_cache": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    if family == "mixtral":
        return MixtralConfig(
            **common,
            intermediate_size=shape.expert_intermediate_size,
            num_local_experts=shape.num_experts,
        )
    if family == "qwen2_moe":
        return Qwen2MoeConfig(
            **common,
            intermediate_size=shape.expert_intermediate_size,
            moe_intermediate_size=shape.expert_intermediate_size,
            shared_expert_intermediate_size=shape.shared_expert_intermediate_size or shape.expert_intermediate_size,
            num_experts=shape.num_experts,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    raise UnknownPresetError(f"unknown model family {family!r}; choose one of {list(FAMILIES)}")


def family_of(config: PretrainedConfig) -> Family:
    """The supported family a config belongs to, or a clear error for any other architecture."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type == family:
            return family
    raise UnknownPresetError(f"model type {model_type!r} is not a supported MoE family; supported: {list(FAMILIES)}")


def build_model(
    preset: str = "tiny", family: str = "mixtral", *, vocab_size: int | None = None, seed: int = 0
) -> PreTrainedModel:
    """A freshly initialised fp32 model of `family` shaped like `preset`; one seed gives bitwise one set of weights."""
    config = build_config(preset, family, vocab_size=vocab_size)
    model_class: type[PreTrainedModel] = MixtralForCausalLM if family == "mixtral" else Qwen2MoeForCausalLM
    # fork_rng keeps the caller's global RNG stream untouched, so building a model never shifts their randomness.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    nn.Module.eval(model)
    return model


def preset_summary(name: str) -> dict[str, Any]:
    """The preset's fields as a plain dict (for manifests and benchmark reports)."""
    return asdict(get_preset(name))
