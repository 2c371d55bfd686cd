"""One local training run on the device: adapters on the frozen (possibly quantized) champion, trained on the local
JSONL records, plus how many tokens the router sent to each expert (the aggregator weights per expert by it)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fednested.adapters import ExpertLoraConfig, adapter_state_dict
from fednested.data.records import Record
from fednested.training.edge import EdgeTrainConfig, TrainMetrics, train_adapters

_LAYER_IN_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class LocalTrainingResult:
    """What a run produced: the adapter tensors that may leave the device, and the numbers the envelope carries."""

    adapters: dict[str, torch.Tensor]
    routed_tokens: dict[str, int]
    examples: int
    metrics: TrainMetrics
    started_at: datetime
    finished_at: datetime


def router_modules(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer index, router) for every MoE layer. transformers 5's MoE families route with a `*TopKRouter` module
    returning (logits, scores, top-k indices); that last output is exactly what decides which expert sees a token."""
    found = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("TopKRouter"):
            match = _LAYER_IN_NAME.search(name)
            if match is None:
                raise ValueError(f"router module {name!r} is not under a numbered layer; cannot attribute its tokens")
            found.append((int(match.group(1)), module))
    return found


@contextmanager
def count_routed_tokens(model: nn.Module) -> Iterator[dict[str, int]]:
    """Within the block, count per "layer.expert" the tokens each router sent to each expert (a token routed to
    top-k experts counts once for each of them). Only forwards with autograd on are counted: evaluation passes
    under no_grad do not train the expert, so they must not earn it aggregation weight."""
    routers = router_modules(model)
    if not routers:
        raise ValueError(f"{type(model).__name__} has no top-k router modules; is it a supported MoE model?")
    counts: dict[str, int] = {}

    def make_hook(layer: int) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not torch.is_grad_enabled():
                return
            if not (isinstance(output, tuple) and len(output) == 3 and isinstance(output[2], torch.Tensor)):
                raise TypeError(f"router of layer {layer} returned {type(output).__name__}, not (logits, scores, idx)")
            indices = output[2].reshape(-1)
            per_expert = torch.bincount(indices)
            for expert, tokens in enumerate(per_expert.tolist()):
                if tokens:
                    key = f"{layer}.{expert}"
                    counts[key] = counts.get(key, 0) + int(tokens)

        return hook

    handles = [module.register_forward_hook(make_hook(layer)) for layer, module in routers]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def train_local_adapters(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    config: EdgeTrainConfig,
) -> LocalTrainingResult:
    """Train the adapters already attached to `model` on `records`; returns the adapter tensors (detached copies,
    on CPU) and the routed-token counts."""
    if not records:
        raise ValueError("no training records: the local data files held no valid lines")
    started_at = datetime.now(UTC)
    with count_routed_tokens(model) as routed:
        metrics = train_adapters(model, tokenizer, records, config)
    finished_at = datetime.now(UTC)
    adapters = {name: tensor.detach().to("cpu").clone() for name, tensor in adapter_state_dict(model).items()}
    return LocalTrainingResult(
        adapters=adapters,
        routed_tokens=dict(sorted(routed.items(), key=lambda item: tuple(map(int, item[0].split("."))))),
        examples=len(records),
        metrics=metrics,
        started_at=started_at,
        finished_at=finished_at,
    )


def adapter_summary(config: ExpertLoraConfig) -> dict[str, Any]:
    """The envelope's adapter block (rank, alpha, targets) from the config the adapters were attached with."""
    return {"rank": int(config.rank), "alpha": float(config.alpha), "target_modules": list(config.targets)}
