"""Anti-forgetting safeguards on the tiny preset: the EWC penalty's exact gradient, bitwise-frozen experts,
distillation toward the base, replay mixing, every bad Fisher file refused, and safeguards off changing nothing."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerFast

from fednested.adapters import ExpertLoraConfig, adapter_state_dict, attach_expert_adapters, expert_lora_layers
from fednested.checkpoints import CheckpointError
from fednested.config import SettingError
from fednested.config.training import SafeguardConfig
from fednested.data import (
    BpeTokenizerConfig,
    CorpusConfig,
    DomainCorpus,
    Record,
    encode_records,
    generate_corpus,
    record_texts,
    train_bpe_tokenizer,
)
from fednested.data.packing import iter_batches, pack_whole_examples
from fednested.models import build_model
from fednested.training import EdgeTrainConfig, train_adapters
from fednested.training.safeguards import (
    FISHER_FILE_NAME,
    FisherFileError,
    SafeguardError,
    adapter_deltas,
    adapter_fisher,
    adapters_disabled,
    distillation_loss,
    estimate_fisher,
    ewc_penalty,
    fisher_shapes,
    load_fisher_file,
    mix_replay,
    save_fisher_file,
    target_logits,
)


@pytest.fixture(scope="module")
def corpus() -> dict[str, DomainCorpus]:
    return generate_corpus(CorpusConfig(seed=0, train_samples=40, heldout_samples=8))


@pytest.fixture(scope="module")
def tokenizer(corpus: dict[str, DomainCorpus]) -> PreTrainedTokenizerFast:
    texts = [text for domain in corpus.values() for text in record_texts(domain.mixed_records("train"))]
    return train_bpe_tokenizer(texts, BpeTokenizerConfig(vocab_size=512))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _adapted(tokenizer: PreTrainedTokenizerFast) -> PeftModel:
    return attach_expert_adapters(
        build_model("tiny", vocab_size=len(tokenizer), seed=0), ExpertLoraConfig(rank=4, alpha=8, init_seed=0)
    )


def _config(safeguards: SafeguardConfig | None = None, **overrides: object) -> EdgeTrainConfig:
    settings: dict[str, object] = {"seq_len": 64, "rows_per_batch": 2, "max_steps": 3, "precision": "fp32", "seed": 3}
    settings.update(overrides)
    return EdgeTrainConfig(safeguards=safeguards or SafeguardConfig(), **settings)  # type: ignore[arg-type]


def _medical(corpus: dict[str, DomainCorpus]) -> list[Record]:
    return corpus["medical"].mixed_records("train")


def _replay(corpus: dict[str, DomainCorpus]) -> list[Record]:
    return [record for name in ("legal", "code") for record in corpus[name].mixed_records("train")[:6]]


def _random_fisher(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(shape, generator=generator) for name, shape in fisher_shapes(model).items()}


def _factor(container: torch.nn.ModuleDict, target: str) -> torch.nn.Parameter:
    factors = container["default"]
    assert isinstance(factors, torch.nn.ParameterDict)
    factor = factors[target]
    assert isinstance(factor, torch.nn.Parameter)
    return factor


# --------------------------------------------------------------------------------------------------------------------
# EWC


def test_ewc_penalty_and_its_gradient_match_a_hand_computation(tokenizer: PreTrainedTokenizerFast) -> None:
    model = _adapted(tokenizer)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at 0 (ΔW = 0, gradient 0): give every factor a value
        for layer in expert_lora_layers(model):
            for target in layer.lora_targets["default"]:
                factor = _factor(layer.lora_B, target)
                factor.copy_(torch.randn(factor.shape, generator=generator) * 0.05)
    fisher = _random_fisher(model)
    strength = 3.0
    gathered = adapter_fisher(model, fisher)
    penalty = ewc_penalty(adapter_deltas(model), gathered, strength=strength)
    torch.autograd.backward(penalty)

    expert_names = [name for name in fisher if ".mlp.experts." in name]
    mean = sum(float(fisher[name].double().sum()) for name in expert_names) / sum(
        fisher[name].numel() for name in expert_names
    )
    expected_penalty = 0.0
    for layer in expert_lora_layers(model):
        scale = float(layer.scaling["default"])
        for target in layer.lora_targets["default"]:
            lora_a = _factor(layer.lora_A, target).detach()
            lora_b = _factor(layer.lora_B, target).detach()
            weights = fisher[f"{layer.module_name}.{target}"] / mean
            for slot, expert in enumerate(layer.lora_experts["default"]):
                delta = scale * lora_b[slot] @ lora_a[slot]
                weighted = weights[expert] * delta
                expected_penalty += 0.5 * strength * float((weights[expert] * delta.square()).sum())
                # d/dB (λ/2 Σ F (sBA)²) = λ s (F⊙ΔW) Aᵀ;  d/dA = λ s Bᵀ (F⊙ΔW)
                grad_b = strength * scale * weighted @ lora_a[slot].T
                grad_a = strength * scale * lora_b[slot].T @ weighted
                got_b = _factor(layer.lora_B, target).grad
                got_a = _factor(layer.lora_A, target).grad
                assert got_a is not None
                assert got_b is not None
                torch.testing.assert_close(got_b[slot], grad_b, rtol=1e-4, atol=1e-7)
                torch.testing.assert_close(got_a[slot], grad_a, rtol=1e-4, atol=1e-7)
    assert float(penalty.detach()) == pytest.approx(expected_penalty, rel=1e-4)
    assert expected_penalty > 0


def test_ewc_pulls_the_adapters_toward_zero_delta(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast
) -> None:
    sizes = {}
    for strength in (0.0, 1e4):
        model = _adapted(tokenizer)
        fisher = _random_fisher(model)
        metrics = train_adapters(
            model, tokenizer, _medical(corpus), _config(SafeguardConfig(ewc_lambda=strength)), fisher=fisher
        )
        sizes[strength] = sum(float(delta.detach().square().sum()) for delta in adapter_deltas(model).values())
        assert (metrics.ewc_penalty is None) == (strength == 0)
    assert sizes[1e4] < 0.5 * sizes[0.0]


def test_ewc_without_a_fisher_refuses_to_start(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast
) -> None:
    model = _adapted(tokenizer)
    before = adapter_state_dict(model)
    with pytest.raises(SafeguardError, match=r"ewc_lambda=0.5.*no Fisher.*fisher\.safetensors"):
        train_adapters(model, tokenizer, _medical(corpus), _config(SafeguardConfig(ewc_lambda=0.5)))
    after = adapter_state_dict(model)
    assert all(torch.equal(before[key], after[key]) for key in before)


# --------------------------------------------------------------------------------------------------------------------
# Fisher estimation and the file


def test_estimate_fisher_covers_the_experts_and_leaves_the_model_as_it_was(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast
) -> None:
    model = build_model("tiny", vocab_size=len(tokenizer), seed=0)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    protected = {name: corpus[name].mixed_records("heldout") for name in ("legal", "code")}
    fisher = estimate_fisher(model, tokenizer, protected, max_tokens=600, seq_len=64)
    shapes = fisher_shapes(model)
    assert sorted(fisher) == sorted(name for name in shapes if ".mlp.experts." in name)
    for name, tensor in fisher.items():
        assert tuple(tensor.shape) == shapes[name]
        assert bool((tensor >= 0).all())
        assert float(tensor.sum()) > 0
    assert 600 <= getattr(fisher, "tokens", 0) < 600 + 2 * 64  # each domain stops at the first row past its half
    assert not any(parameter.requires_grad for parameter in model.parameters())
    assert all(torch.equal(weights[name], tensor) for name, tensor in model.state_dict().items())
    with_core = estimate_fisher(model, tokenizer, protected, max_tokens=200, seq_len=64, include="experts+core")
    assert set(with_core) == set(shapes)


def test_fisher_file_round_trip(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    model = _adapted(tokenizer)
    fisher = _random_fisher(model)
    path = tmp_path / FISHER_FILE_NAME
    save_fisher_file(path, fisher, version_id="v7", domains=["legal", "code"], tokens=123)
    loaded = load_fisher_file(path, expected_version="v7", model=model)
    assert sorted(loaded) == sorted(fisher)
    assert all(torch.equal(loaded[name], fisher[name]) for name in fisher)
    assert issubclass(FisherFileError, CheckpointError)


def _saved(tmp_path: Path, fisher: dict[str, torch.Tensor], version: str = "v7") -> Path:
    path = tmp_path / FISHER_FILE_NAME
    # bypasses save_fisher_file's own checks, as a file written by other code or damaged on disk would
    from safetensors.torch import save_file

    metadata = {"format": "1", "version_id": version, "domains": '["legal"]', "tokens": "10"}
    save_file({name: tensor.contiguous() for name, tensor in fisher.items()}, str(path), metadata=metadata)
    return path


def test_each_bad_fisher_file_is_refused_with_its_reason(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    model = _adapted(tokenizer)
    fisher = _random_fisher(model)
    expert = "model.layers.0.mlp.experts.down_proj"

    def refused(path: Path, pattern: str) -> None:
        with pytest.raises(FisherFileError, match=pattern) as raised:
            load_fisher_file(path, expected_version="v7", model=model)
        assert str(path) in str(raised.value)

    refused(tmp_path / "absent" / FISHER_FILE_NAME, "missing")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    refused(corrupt, "corrupt")
    truncated = _saved(tmp_path, fisher)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    refused(truncated, "corrupt")
    refused(_saved(tmp_path, fisher, version="v6"), r"other version: estimated for version 'v6'.*'v7'")
    wrong_shape = dict(fisher, **{expert: torch.rand(3, 5, 7)})
    refused(_saved(tmp_path, wrong_shape), rf"other shapes: tensor '{expert}' has shape \[3, 5, 7\]")
    unknown = dict(fisher, **{"model.layers.9.mlp.experts.down_proj": torch.rand(2)})
    refused(_saved(tmp_path, unknown), "not a weight of this model")
    missing = {name: tensor for name, tensor in fisher.items() if name != expert}
    refused(_saved(tmp_path, missing), "no Fisher for expert tensor")
    nan = dict(fisher, **{expert: fisher[expert].clone().index_fill_(0, torch.tensor([1]), math.nan)})
    refused(_saved(tmp_path, nan), "NaN or infinite")
    negative = dict(fisher, **{expert: -fisher[expert]})
    refused(_saved(tmp_path, negative), "negative values")
    with pytest.raises(FisherFileError, match="NaN or infinite"):
        save_fisher_file(tmp_path / "x.safetensors", nan, version_id="v7", domains=["legal"])


# --------------------------------------------------------------------------------------------------------------------
# freezing


def test_frozen_experts_and_layers_stay_bitwise_unchanged(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast
) -> None:
    safeguards = SafeguardConfig(freeze_experts=("0:1", "0:3"), freeze_layers=(1,))
    model = _adapted(tokenizer)
    before = adapter_state_dict(model)
    # weight decay moves a weight even at zero gradient: the restore must undo that too
    train_adapters(model, tokenizer, _medical(corpus), _config(safeguards, weight_decay=0.1, max_steps=4))
    after = adapter_state_dict(model)
    frozen = [key for key in before if "layers.1." in key or "/expert=1/" in key or "/expert=3/" in key]
    trained = [key for key in before if key not in frozen]
    assert frozen
    assert trained
    for key in frozen:
        assert torch.equal(before[key], after[key]), key
    assert all(not torch.equal(before[key], after[key]) for key in trained if key.endswith("lora_B"))


def test_freezing_what_the_edge_cannot_name_is_refused(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast
) -> None:
    for safeguards, pattern in [
        (SafeguardConfig(freeze_gate=True), "never the gate"),
        (SafeguardConfig(freeze_layers=(5,)), "names layer 5"),
        (SafeguardConfig(freeze_experts=("0:4",)), "names '0:4'"),
    ]:
        with pytest.raises(SafeguardError, match=pattern):
            train_adapters(_adapted(tokenizer), tokenizer, _medical(corpus), _config(safeguards))
    with pytest.raises(SettingError, match="freeze_experts"):
        SafeguardConfig(freeze_experts=("layer0",))


# --------------------------------------------------------------------------------------------------------------------
# distillation and replay


def _distance_to_base(model: PeftModel, tokenizer: PreTrainedTokenizerFast, records: list[Record]) -> float:
    rows = pack_whole_examples(encode_records(records, tokenizer), 128, pad_id=tokenizer.pad_token_id or 0)
    total = 0.0
    with torch.no_grad():
        for batch in iter_batches(rows, 4):
            student = target_logits(model, batch)
            with adapters_disabled(model):
                teacher = target_logits(model, batch)
            total += float(distillation_loss(student, teacher, temperature=1.0))
    return total


def test_distillation_keeps_the_logits_closer_to_the_base(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast
) -> None:
    probe = [record for name in ("legal", "code") for record in corpus[name].mixed_records("heldout")]
    distances = {}
    for weight in (0.0, 5.0):
        model = _adapted(tokenizer)
        safeguards = SafeguardConfig(distill_weight=weight, distill_temperature=1.0)
        metrics = train_adapters(
            model,
            tokenizer,
            _medical(corpus),
            _config(safeguards, learning_rate=1e-2, max_steps=6),
            replay=_replay(corpus),
        )
        assert (metrics.distill_loss is not None) == (weight > 0)
        distances[weight] = _distance_to_base(model, tokenizer, probe)
    assert distances[0.0] > 0
    assert distances[5.0] < 0.7 * distances[0.0]


def test_adapters_disabled_gives_the_base_models_logits(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast
) -> None:
    model = _adapted(tokenizer)
    train_adapters(model, tokenizer, _medical(corpus), _config(learning_rate=1e-2))
    base = build_model("tiny", vocab_size=len(tokenizer), seed=0)
    rows = pack_whole_examples(encode_records(_replay(corpus)[:4], tokenizer), 128, pad_id=0)
    batch = next(iter(iter_batches(rows, 4)))
    with torch.no_grad():
        with adapters_disabled(model):
            disabled = target_logits(model, batch)
        adapted = target_logits(model, batch)
        plain = target_logits(base, batch)
    torch.testing.assert_close(disabled, plain)
    assert not torch.allclose(adapted, plain)


def test_replay_is_mixed_in_at_the_configured_fraction(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast
) -> None:
    local = encode_records(_medical(corpus)[:30], tokenizer)
    replay = encode_records(_replay(corpus), tokenizer)
    mixed = mix_replay(local, replay, 0.25, random.Random(0))
    assert len(mixed) == 40  # 10 of 40 = 0.25
    assert mixed[:30] == local
    assert all(example in replay for example in mixed[30:])
    assert len(mix_replay(local, replay[:3], 0.5, random.Random(0))) == 60  # the set is drawn again when it runs out
    metrics = train_adapters(
        _adapted(tokenizer),
        tokenizer,
        _medical(corpus)[:30],
        _config(SafeguardConfig(replay_fraction=0.25)),
        replay=_replay(corpus),
    )
    assert metrics.replay_records == 10
    with pytest.raises(SafeguardError, match="replay_fraction is set but no replay records"):
        train_adapters(_adapted(tokenizer), tokenizer, _medical(corpus), _config(SafeguardConfig(replay_fraction=0.25)))


# --------------------------------------------------------------------------------------------------------------------
# regression


def test_safeguards_off_train_bitwise_the_same_adapters(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast
) -> None:
    """All off (even with a Fisher and replay records at hand) is the loop without safeguards, bit for bit."""
    states = []
    for fisher, replay in [(None, None), (_random_fisher(_adapted(tokenizer)), _replay(corpus))]:
        model = _adapted(tokenizer)
        explicit = SafeguardConfig(ewc_lambda=0.0, distill_weight=0.0, replay_fraction=0.0)
        metrics = train_adapters(
            model, tokenizer, _medical(corpus), _config(explicit, weight_decay=0.01), fisher=fisher, replay=replay
        )
        assert (metrics.ewc_penalty, metrics.distill_loss, metrics.replay_records) == (None, None, 0)
        states.append(adapter_state_dict(model))
    model = _adapted(tokenizer)
    train_adapters(model, tokenizer, _medical(corpus), _config(weight_decay=0.01))
    states.append(adapter_state_dict(model))
    for state in states[1:]:
        assert all(torch.equal(states[0][key], state[key]) for key in states[0])
