"""The edge training loop: LoRA adapters only, on packed local records, within a step and wall-clock budget.

The frozen base is never touched: only parameters that require grad reach the optimizer. The same seed, data,
model and thread count give bitwise-identical adapters.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fednested.adapters.routed import set_expert_recompute

# Declared in the torch-free config package (the tier2 YAML section `training:` is this dataclass); re-exported here.
from fednested.config.training import EdgeTrainConfig as EdgeTrainConfig
from fednested.data.encoding import EncodedExample, encode_records
from fednested.data.packing import PackedBatch, iter_batches, pack_examples
from fednested.data.records import ChatRecord, PromptCompletionRecord, Record, TextRecord
from fednested.training.forward import model_device, packed_loss_sum, resolve_precision
from fednested.training.safeguards import EdgeSafeguards

StopReason: TypeAlias = Literal["max_steps", "max_seconds", "max_epochs"]


@dataclass
class TrainMetrics:
    """What a run did. `tokens` counts real (non-padding) input tokens; `tokens_per_s` is that over the run's
    wall-clock duration (encoding and packing included), i.e. the effective training throughput."""

    steps: int = 0
    micro_batches: int = 0
    tokens: int = 0
    target_tokens: int = 0
    padding_tokens: int = 0
    epochs: float = 0.0
    duration_s: float = 0.0
    tokens_per_s: float = 0.0
    slowest_step_s: float = 0.0
    loss_curve: list[float] = field(default_factory=list)
    stop_reason: StopReason = "max_steps"
    precision: Literal["fp32", "bf16"] = "fp32"
    trainable_parameters: int = 0
    num_threads: int = 0
    # Safeguards (fednested.training.safeguards): the last step's EWC penalty and distillation KL (None when off),
    # and how many replay records were mixed into the training data.
    ewc_penalty: float | None = None
    distill_loss: float | None = None
    replay_records: int = 0

    @property
    def final_loss(self) -> float:
        return self.loss_curve[-1] if self.loss_curve else math.nan


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that training may change: exactly those that require grad (the adapters)."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def _as_examples(
    data: Sequence[Record] | Sequence[EncodedExample], tokenizer: PreTrainedTokenizerBase
) -> list[EncodedExample]:
    if all(isinstance(item, EncodedExample) for item in data):
        return [item for item in data if isinstance(item, EncodedExample)]
    records = [item for item in data if isinstance(item, (TextRecord, PromptCompletionRecord, ChatRecord))]
    if len(records) != len(data):
        raise TypeError("training data must be all records or all encoded examples, not a mix")
    return encode_records(records, tokenizer)


def _epoch_windows(
    examples: Sequence[EncodedExample], config: EdgeTrainConfig, pad_id: int, rng: random.Random
) -> list[list[PackedBatch]]:
    """One epoch, shuffled and packed, grouped into optimizer steps of `grad_accum_steps` micro-batches."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    rows = pack_examples([examples[index] for index in order], config.seq_len, pad_id=pad_id)
    batches = list(iter_batches(rows, config.rows_per_batch))
    step = config.grad_accum_steps
    return [batches[start : start + step] for start in range(0, len(batches), step)]


@contextmanager
def _expert_recompute(model: nn.Module, enabled: bool) -> Iterator[None]:
    # The adapters' expert layers carry a `recompute_activations` switch (fednested.adapters.set_expert_recompute);
    # it is set for this run only, and every layer gets its own previous value back.
    layers = [module for module in model.modules() if hasattr(module, "recompute_activations")]
    if enabled and not layers:
        raise ValueError("recompute_experts is set but the model has no expert layers that support it")
    previous = [module.recompute_activations for module in layers]
    if enabled:
        set_expert_recompute(model, True)
    try:
        yield
    finally:
        for module, value in zip(layers, previous, strict=True):
            module.recompute_activations = value


@contextmanager
def _torch_threads(count: int | None) -> Iterator[int]:
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def _learning_rate_scale(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def train_adapters(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: Sequence[Record] | Sequence[EncodedExample],
    config: EdgeTrainConfig,
    *,
    fisher: Mapping[str, torch.Tensor] | None = None,
    replay: Sequence[Record] | None = None,
) -> TrainMetrics:
    """Train the model's adapters (its parameters that require grad) on `data`; returns what the run did.

    `config.safeguards` switches the anti-forgetting safeguards on: EWC needs `fisher` (the parent version's, from
    `fednested.training.safeguards.load_fisher_file`), replay and distillation need `replay` (the federation's
    public or synthetic records). A safeguard asked for without what it needs raises SafeguardError before any
    step; with every safeguard off the run is bitwise the run without them.

    Each optimizer step averages the loss over every target token of its `grad_accum_steps` micro-batches, so
    accumulating two micro-batches of b rows is the same step as one batch of 2b rows. The wall-clock budget is
    checked before each step against the slowest recent step, so a run does not start a step it cannot finish.
    """
    started = time.perf_counter()
    parameters = trainable_parameters(model)
    if not parameters:
        raise ValueError("the model has no trainable parameters; attach adapters first (fednested.adapters)")
    if not data:
        raise ValueError("no training data: the record list is empty")
    pad_id = tokenizer.pad_token_id if isinstance(tokenizer.pad_token_id, int) else tokenizer.eos_token_id
    if not isinstance(pad_id, int):
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad the last packed row with")

    device = model_device(model)
    precision = resolve_precision(config.precision, device)
    metrics = TrainMetrics(precision=precision, trainable_parameters=sum(p.numel() for p in parameters))
    safeguards = None
    if config.safeguards.any_enabled:
        safeguards = EdgeSafeguards.prepare(
            model,
            tokenizer,
            config.safeguards,
            fisher=fisher,
            replay=replay,
            seq_len=config.seq_len,
            rows_per_batch=config.rows_per_batch,
            pad_id=pad_id,
        )
    with _torch_threads(config.num_threads) as threads, _expert_recompute(model, config.recompute_experts):
        metrics.num_threads = threads
        torch.manual_seed(config.seed)  # adapter dropout, if any, draws from the global generator
        rng = random.Random(config.seed)
        examples = _as_examples(data, tokenizer)
        if safeguards is not None:
            local = len(examples)
            examples = safeguards.mix(examples, config.seed)
            metrics.replay_records = len(examples) - local
        optimizer = torch.optim.AdamW(
            parameters,
            lr=config.learning_rate,
            betas=config.adam_betas,
            weight_decay=config.weight_decay,
            foreach=device.type != "cpu",
            # The fused CPU kernel updates all adapter tensors in one pass instead of a dozen ops per tensor.
            fused=device.type == "cpu" or None,
        )
        was_training = model.training
        model.train()
        step_times: list[float] = []
        epoch = 0
        try:
            while True:
                windows = _epoch_windows(examples, config, pad_id, rng)
                for window_index, window in enumerate(windows):
                    reason = _budget_reached(metrics, config, started, step_times)
                    if reason is not None:
                        metrics.stop_reason = reason
                        return metrics
                    step_started = time.perf_counter()
                    loss = _optimizer_step(model, optimizer, parameters, window, config, precision, metrics, safeguards)
                    metrics.loss_curve.append(loss)
                    metrics.steps += 1
                    metrics.epochs = epoch + (window_index + 1) / len(windows)
                    step_times.append(time.perf_counter() - step_started)
                    metrics.slowest_step_s = max(metrics.slowest_step_s, step_times[-1])
                epoch += 1
                if config.max_epochs is not None and epoch >= config.max_epochs:
                    metrics.stop_reason = "max_epochs"
                    return metrics
        finally:
            model.train(was_training)
            optimizer.zero_grad(set_to_none=True)
            metrics.duration_s = time.perf_counter() - started
            metrics.tokens_per_s = metrics.tokens / metrics.duration_s if metrics.duration_s > 0 else 0.0


def _budget_reached(
    metrics: TrainMetrics, config: EdgeTrainConfig, started: float, step_times: list[float]
) -> StopReason | None:
    if config.max_steps is not None and metrics.steps >= config.max_steps:
        return "max_steps"
    if config.max_epochs is not None and metrics.epochs >= config.max_epochs:
        return "max_epochs"
    if config.max_seconds is not None:
        # The slowest of the last few steps is the forecast: a single fast step must not talk us into overrunning.
        forecast = max(step_times[-3:]) if step_times else 0.0
        if time.perf_counter() - started + forecast > config.max_seconds:
            return "max_seconds"
    return None


def _optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    parameters: list[nn.Parameter],
    window: list[PackedBatch],
    config: EdgeTrainConfig,
    precision: Literal["fp32", "bf16"],
    metrics: TrainMetrics,
    safeguards: EdgeSafeguards | None = None,
) -> float:
    """Forward and backward every micro-batch of the window, then one optimizer update; returns the mean loss
    (the data's cross-entropy only: the safeguards' terms are reported in metrics)."""
    for group in optimizer.param_groups:
        group["lr"] = config.learning_rate * _learning_rate_scale(metrics.steps, config.warmup_steps)
    window_targets = sum(batch.target_tokens for batch in window)
    device = model_device(model)
    loss_total = 0.0
    for batch in window:
        if batch.target_tokens == 0:
            continue  # nothing to learn in this micro-batch (possible only for a tail of padding)
        on_device = batch.to(device)
        loss_sum, _ = packed_loss_sum(model, on_device, precision=precision)
        # Dividing by the window's target count (not the micro-batch's) makes accumulation exact.
        torch.autograd.backward(loss_sum / window_targets)
        loss_total += float(loss_sum.detach())
        metrics.micro_batches += 1
        metrics.tokens += batch.real_tokens
        metrics.target_tokens += batch.target_tokens
        metrics.padding_tokens += batch.input_ids.numel() - batch.real_tokens
    if safeguards is not None:
        # once per step, not per micro-batch: the penalty is on the weights, the distillation on its own replay batch
        safeguards.add_terms(model, precision)
        metrics.ewc_penalty = safeguards.terms.ewc_penalty
        metrics.distill_loss = safeguards.terms.distill_loss
        safeguards.before_step()
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if safeguards is not None:
        safeguards.after_step()
    return loss_total / max(window_targets, 1)
