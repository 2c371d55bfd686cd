"""Held-out loss and perplexity per domain, the numbers the forgetting report and the promotion gate compare.

Loss is the mean next-token cross-entropy over every target token of the domain (tokens, not records, carry equal
weight), computed with the same packed forward as training; records are never split, so no token loses context.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fednested.config.training import Precision
from fednested.data.encoding import encode_records
from fednested.data.packing import iter_batches, pack_whole_examples
from fednested.data.records import Record
from fednested.training.forward import model_device, packed_loss_sum, resolve_precision


@dataclass(frozen=True)
class EvalConfig:
    """Row length and rows per forward for evaluation; fp32 by default so reports compare across machines."""

    seq_len: int = 512
    rows_per_batch: int = 8
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        if self.seq_len < 2 or self.rows_per_batch < 1:
            raise ValueError(f"seq_len must be >= 2 and rows_per_batch >= 1, got {self.seq_len}, {self.rows_per_batch}")


@dataclass(frozen=True)
class DomainEval:
    """A domain's held-out result: mean loss per target token (nats), its perplexity exp(loss), and the counts."""

    loss: float
    perplexity: float
    tokens: int
    records: int


def perplexity_of(loss: float) -> float:
    """exp(loss), saturating to infinity instead of raising for a model that is hopelessly wrong."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def evaluate_records(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    config: EvalConfig | None = None,
) -> DomainEval:
    """Loss and perplexity of `model` on `records`; the model's train/eval mode is restored afterwards."""
    config = config or EvalConfig()
    if not records:
        raise ValueError("cannot evaluate on an empty list of records")
    examples = encode_records(records, tokenizer)
    pad_id = tokenizer.pad_token_id if isinstance(tokenizer.pad_token_id, int) else tokenizer.eos_token_id
    if not isinstance(pad_id, int):
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad rows with")
    rows = pack_whole_examples(examples, config.seq_len, pad_id=pad_id)
    device = model_device(model)
    precision = resolve_precision(config.precision, device)
    loss_total = 0.0
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in iter_batches(rows, config.rows_per_batch):
                if batch.target_tokens == 0:
                    continue
                loss_sum, count = packed_loss_sum(model, batch.to(device), precision=precision)
                loss_total += float(loss_sum)  # accumulate in float64 on the host: domains can hold millions of tokens
                tokens += count
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("the records hold no target tokens to evaluate")
    loss = loss_total / tokens
    return DomainEval(loss=loss, perplexity=perplexity_of(loss), tokens=tokens, records=len(records))


def evaluate_domains(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records_by_domain: Mapping[str, Sequence[Record]],
    config: EvalConfig | None = None,
) -> dict[str, DomainEval]:
    """`evaluate_records` for each domain, in the mapping's order."""
    results = {}
    for domain, records in records_by_domain.items():
        try:
            results[domain] = evaluate_records(model, tokenizer, records, config)
        except ValueError as error:
            raise ValueError(f"domain {domain!r}: {error}") from error
    return results
