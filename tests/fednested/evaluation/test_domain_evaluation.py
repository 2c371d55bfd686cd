"""Per-domain evaluation: the loss is the real token-mean cross-entropy (checked against transformers' own loss on
unpacked records), perplexity is exp(loss), and nothing about the model changes."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from fednested.adapters import ExpertLoraConfig, attach_expert_adapters
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
from fednested.evaluation import EvalConfig, evaluate_domains, evaluate_records, perplexity_of
from fednested.models import build_model, model_fingerprint


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls; avoids OpenMP stalls on a shared CI machine
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def corpus() -> dict[str, DomainCorpus]:
    return generate_corpus(CorpusConfig(seed=4, train_samples=40, heldout_samples=8))


@pytest.fixture(scope="module")
def tokenizer(corpus: dict[str, DomainCorpus]) -> PreTrainedTokenizerFast:
    texts = [text for domain in corpus.values() for text in record_texts(domain.mixed_records("train"))]
    return train_bpe_tokenizer(texts, BpeTokenizerConfig(vocab_size=512))


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    return build_model("tiny", vocab_size=len(tokenizer), seed=3)


def _reference_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, records: list[Record]) -> float:
    """transformers' own causal-LM loss, one unpacked record at a time, weighted by each record's target count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for example in encode_records(records, tokenizer):
            input_ids = torch.tensor([example.input_ids])
            labels = torch.tensor([example.labels])
            output = model(input_ids=input_ids, labels=labels)
            targets = example.target_count
            total += float(output.loss) * targets
            count += targets
    return total / count


def test_loss_equals_transformers_loss_on_unpacked_records_for_every_format(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast, model: PreTrainedModel
) -> None:
    for record_format in ("text", "prompt_completion", "messages"):
        records = corpus["recipes"].records("heldout", record_format)  # type: ignore[arg-type]
        # short rows force many records into each row: any attention leak across records would change the loss
        result = evaluate_records(model, tokenizer, records, EvalConfig(seq_len=256, rows_per_batch=2))
        assert result.loss == pytest.approx(_reference_loss(model, tokenizer, records), rel=1e-5), record_format
        assert result.tokens == sum(example.target_count for example in encode_records(records, tokenizer))
        assert result.records == len(records)


def test_perplexity_is_exp_of_the_loss(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast, model: PreTrainedModel
) -> None:
    results = evaluate_domains(model, tokenizer, {name: d.records("heldout", "text") for name, d in corpus.items()})
    assert list(results) == list(corpus)
    for result in results.values():
        assert result.perplexity == math.exp(result.loss)
        # an untrained model is close to uniform over the vocabulary
        assert abs(result.loss - math.log(len(tokenizer))) < 1.0


def test_row_length_and_batching_do_not_change_the_result(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast, model: PreTrainedModel
) -> None:
    records = corpus["code"].mixed_records("heldout")
    narrow = evaluate_records(model, tokenizer, records, EvalConfig(seq_len=128, rows_per_batch=1))
    wide = evaluate_records(model, tokenizer, records, EvalConfig(seq_len=1024, rows_per_batch=4))
    assert narrow.tokens == wide.tokens
    assert narrow.loss == pytest.approx(wide.loss, rel=1e-5)


def test_evaluation_leaves_weights_and_training_mode_alone(
    corpus: dict[str, DomainCorpus], tokenizer: PreTrainedTokenizerFast
) -> None:
    adapted = attach_expert_adapters(build_model("tiny", vocab_size=len(tokenizer)), ExpertLoraConfig(rank=2))
    adapted.train()
    fingerprint = model_fingerprint(adapted)
    evaluate_domains(adapted, tokenizer, {"legal": corpus["legal"].records("heldout", "text")})
    assert adapted.training
    assert model_fingerprint(adapted) == fingerprint
    assert all(parameter.grad is None for parameter in adapted.parameters())


def test_empty_domain_is_an_error_that_names_it(tokenizer: PreTrainedTokenizerFast, model: PreTrainedModel) -> None:
    with pytest.raises(ValueError, match="domain 'legal': cannot evaluate on an empty list of records"):
        evaluate_domains(model, tokenizer, {"legal": []})


def test_perplexity_saturates_instead_of_overflowing() -> None:
    assert perplexity_of(1000.0) == math.inf
    assert perplexity_of(0.0) == 1.0
