"""The edge adapter loop on the tiny preset: determinism, budgets, exact accumulation, frozen base, learning."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerFast

from fednested.adapters import ExpertLoraConfig, adapter_state_dict, attach_expert_adapters
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
from fednested.evaluation import evaluate_domains
from fednested.models import build_model
from fednested.training import EdgeTrainConfig, train_adapters, trainable_parameters


@pytest.fixture(scope="module")
def corpus() -> dict[str, DomainCorpus]:
    return generate_corpus(CorpusConfig(seed=0, train_samples=60, heldout_samples=12))


@pytest.fixture(scope="module")
def tokenizer(corpus: dict[str, DomainCorpus]) -> PreTrainedTokenizerFast:
    texts = [text for domain in corpus.values() for text in record_texts(domain.mixed_records("train"))]
    return train_bpe_tokenizer(texts, BpeTokenizerConfig(vocab_size=512))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny matmuls gain nothing from a second thread, and on a shared CI machine a descheduled OpenMP worker stalls
    # every barrier; one thread keeps these tests fast and their timings steady.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _adapted_model(tokenizer: PreTrainedTokenizerFast, *, init_seed: int = 0) -> PeftModel:
    model = build_model("tiny", vocab_size=len(tokenizer), seed=0)
    return attach_expert_adapters(model, ExpertLoraConfig(rank=4, alpha=8, init_seed=init_seed))


def _medical(corpus: dict[str, DomainCorpus]) -> list[Record]:
    return corpus["medical"].mixed_records("train")


def _small_run(**overrides: object) -> EdgeTrainConfig:
    settings: dict[str, object] = {"seq_len": 64, "rows_per_batch": 2, "max_steps": 4, "precision": "fp32"}
    settings.update(overrides)
    return EdgeTrainConfig(**settings)  # type: ignore[arg-type]


def test_same_seed_gives_bitwise_identical_adapters(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast
) -> None:
    states = []
    for _ in range(2):
        model = _adapted_model(tokenizer)
        train_adapters(model, tokenizer, _medical(corpus), _small_run(seed=7))
        states.append(adapter_state_dict(model))
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    # and training really moved them (B starts at zero)
    assert any(key.endswith("lora_B") and states[0][key].abs().sum() > 0 for key in states[0])


def test_another_seed_orders_data_differently_and_gives_other_adapters(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast
) -> None:
    results = []
    for seed in (1, 2):
        model = _adapted_model(tokenizer)
        train_adapters(model, tokenizer, _medical(corpus), _small_run(seed=seed))
        results.append(adapter_state_dict(model))
    assert any(not torch.equal(results[0][key], results[1][key]) for key in results[0])


def test_only_adapters_change_and_only_they_reach_the_optimizer(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast
) -> None:
    model = _adapted_model(tokenizer)
    frozen_before = {
        name: parameter.detach().clone() for name, parameter in model.named_parameters() if not parameter.requires_grad
    }
    metrics = train_adapters(model, tokenizer, _medical(corpus), _small_run())
    trainable = trainable_parameters(model)
    assert metrics.trainable_parameters == sum(parameter.numel() for parameter in trainable)
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert names
    assert all("lora_" in name for name in names)
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            assert torch.equal(parameter, frozen_before[name]), f"frozen parameter {name} changed"
            assert parameter.grad is None


def test_max_steps_budget_is_honoured(corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast) -> None:
    model = _adapted_model(tokenizer)
    metrics = train_adapters(model, tokenizer, _medical(corpus), _small_run(max_steps=3))
    assert metrics.steps == 3
    assert metrics.stop_reason == "max_steps"
    assert len(metrics.loss_curve) == 3
    assert metrics.tokens > 0
    assert metrics.tokens_per_s == pytest.approx(metrics.tokens / metrics.duration_s)


def test_wall_clock_budget_stops_the_run_before_it_overruns(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast
) -> None:
    model = _adapted_model(tokenizer)
    budget = 2.0
    started = time.perf_counter()
    metrics = train_adapters(model, tokenizer, _medical(corpus), _small_run(max_steps=100_000, max_seconds=budget))
    elapsed = time.perf_counter() - started
    assert metrics.stop_reason == "max_seconds"
    assert 1 <= metrics.steps < 100_000
    # Each step is forecast from the slowest recent one, so only a step slower than all before it can overrun, and
    # by less than its own length (the first step has no forecast: it always runs).
    assert metrics.duration_s <= budget + metrics.slowest_step_s
    assert elapsed <= budget + metrics.slowest_step_s + 0.1


def test_max_epochs_covers_every_record_exactly_once(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast
) -> None:
    model = _adapted_model(tokenizer)
    records = _medical(corpus)[:20]
    metrics = train_adapters(model, tokenizer, records, _small_run(max_steps=None, max_epochs=1, seq_len=128))
    assert metrics.stop_reason == "max_epochs"
    assert metrics.epochs == 1.0
    assert metrics.tokens == sum(len(example.input_ids) for example in encode_records(records, tokenizer))
    # packing leaves padding only in the last row of the epoch
    assert metrics.padding_tokens < 128


def test_gradient_accumulation_matches_one_batch_of_the_combined_size(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast
) -> None:
    accumulated = _adapted_model(tokenizer)
    single = _adapted_model(tokenizer)
    records = _medical(corpus)
    first = train_adapters(accumulated, tokenizer, records, _small_run(rows_per_batch=2, grad_accum_steps=2))
    second = train_adapters(single, tokenizer, records, _small_run(rows_per_batch=4, grad_accum_steps=1))
    assert first.micro_batches == 2 * second.micro_batches
    assert first.loss_curve == pytest.approx(second.loss_curve, rel=1e-5)
    state_a, state_b = adapter_state_dict(accumulated), adapter_state_dict(single)
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=1e-4, atol=1e-6)


def test_training_lowers_held_out_loss_on_its_domain_more_than_on_the_others(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast
) -> None:
    model = _adapted_model(tokenizer)
    heldout = {name: domain.records("heldout", "text") for name, domain in corpus.items()}
    before = evaluate_domains(model, tokenizer, heldout)
    metrics = train_adapters(
        model, tokenizer, corpus["medical"].records("train", "text"), _small_run(max_steps=25, learning_rate=5e-3)
    )
    after = evaluate_domains(model, tokenizer, heldout)
    assert metrics.loss_curve[-1] < metrics.loss_curve[0] - 0.3
    assert after["medical"].loss < before["medical"].loss - 0.3
    for name in heldout:
        if name != "medical":
            assert after["medical"].loss < after[name].loss, name


def test_bf16_autocast_runs_and_tracks_fp32(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast
) -> None:
    losses = {}
    for precision in ("fp32", "bf16"):
        model = _adapted_model(tokenizer)
        metrics = train_adapters(model, tokenizer, _medical(corpus), _small_run(max_steps=2, precision=precision))
        assert metrics.precision == precision
        losses[precision] = metrics.loss_curve[0]
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=0.05)


def test_bad_configurations_and_inputs_are_refused_with_the_reason(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="set at least one budget"):
        EdgeTrainConfig(max_steps=None)
    with pytest.raises(ValueError, match="grad_accum_steps must be at least 1"):
        EdgeTrainConfig(grad_accum_steps=0)
    with pytest.raises(ValueError, match=r"^EdgeTrainConfig\.seq_len must be at least 8, got 4$"):
        EdgeTrainConfig(seq_len=4)
    with pytest.raises(ValueError, match=r"adam_betas must be two numbers in \[0, 1\), got \(0\.9, 1\.0\)"):
        EdgeTrainConfig(adam_betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        EdgeTrainConfig(precision="fp16")  # type: ignore[arg-type]
    plain = build_model("tiny", vocab_size=len(tokenizer), seed=0)
    for parameter in plain.parameters():
        parameter.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_adapters(plain, tokenizer, [], _small_run())
    with pytest.raises(ValueError, match="no training data"):
        train_adapters(_adapted_model(tokenizer), tokenizer, [], _small_run())


def test_pre_encoded_examples_train_exactly_like_the_records_they_came_from(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast
) -> None:
    records = _medical(corpus)
    from_records, from_examples = _adapted_model(tokenizer), _adapted_model(tokenizer)
    train_adapters(from_records, tokenizer, records, _small_run())
    train_adapters(from_examples, tokenizer, encode_records(records, tokenizer), _small_run())
    state_a, state_b = adapter_state_dict(from_records), adapter_state_dict(from_examples)
    assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)


def test_expert_recompute_gives_the_same_adapters_and_is_switched_off_afterwards(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast
) -> None:
    plain, recomputed = _adapted_model(tokenizer), _adapted_model(tokenizer)
    train_adapters(plain, tokenizer, _medical(corpus), _small_run())
    train_adapters(recomputed, tokenizer, _medical(corpus), _small_run(recompute_experts=True))
    state_a, state_b = adapter_state_dict(plain), adapter_state_dict(recomputed)
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=1e-5, atol=1e-7)
    switches = [
        module.recompute_activations for module in recomputed.modules() if hasattr(module, "recompute_activations")
    ]
    assert switches
    assert not any(switches)
