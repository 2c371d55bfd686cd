"""One local training run on the device: adapters on the frozen (possibly quantized) champion, trained on the local
JSONL records, plus how many tokens the router sent to each expert (the aggregator weights per expert by it)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from edge_client.errors import EdgeClientError
from fednested.adapters import ExpertLoraConfig, adapter_state_dict
from fednested.checkpoints import Manifest
from fednested.checkpoints.safeguards import MAX_REPLAY_BYTES, REPLAY_FILE_NAME, wants_fisher, wants_replay
from fednested.config.training import SafeguardConfig
from fednested.data.jsonl import JsonlFormatError, read_jsonl
from fednested.data.records import Record
from fednested.training.edge import EdgeTrainConfig, TrainMetrics, train_adapters
from fednested.training.safeguards import FISHER_FILE_NAME, FisherFileError, load_fisher_file

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
def count_routed_tokens(model: nn.Module, *, pad_id: int | None = None) -> Iterator[dict[str, int]]:
    """Within the block, count per "layer.expert" the tokens each router sent to each expert (a token routed to
    top-k experts counts once for each of them). Only forwards with autograd on are counted: evaluation passes
    under no_grad do not train the expert, so they must not earn it aggregation weight. With `pad_id`, padding
    positions are not counted either, so that per layer the counts add up to exactly top-k × the real tokens
    trained on — the relation the control plane checks the claim against."""
    routers = router_modules(model)
    if not routers:
        raise ValueError(f"{type(model).__name__} has no top-k router modules; is it a supported MoE model?")
    counts: dict[str, int] = {}
    # The real (non-padding) positions of the forward in progress, as the input embedding saw its token ids.
    real_positions: list[torch.Tensor | None] = [None]

    def remember_input(module: nn.Module, inputs: Any) -> None:
        ids = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        real_positions[0] = (ids != pad_id).reshape(-1) if ids is not None and pad_id is not None else None

    def make_hook(layer: int) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not torch.is_grad_enabled():
                return
            if not (isinstance(output, tuple) and len(output) == 3 and isinstance(output[2], torch.Tensor)):
                raise TypeError(f"router of layer {layer} returned {type(output).__name__}, not (logits, scores, idx)")
            indices = output[2]
            real = real_positions[0]
            if real is not None and indices.dim() == 2 and real.numel() == indices.shape[0]:
                indices = indices[real.to(indices.device)]
            per_expert = torch.bincount(indices.reshape(-1))
            for expert, tokens in enumerate(per_expert.tolist()):
                if tokens:
                    key = f"{layer}.{expert}"
                    counts[key] = counts.get(key, 0) + int(tokens)

        return hook

    handles = [module.register_forward_hook(make_hook(layer)) for layer, module in routers]
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embedding = get_embeddings() if callable(get_embeddings) else None
    if pad_id is not None and isinstance(embedding, nn.Module):
        handles.append(embedding.register_forward_pre_hook(remember_input))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


class SafeguardFilesError(EdgeClientError):
    """A safeguard the round asks for needs a file of the base version that is absent or unusable: training does not
    start (it never runs without a safeguard it was asked for)."""


@dataclass(frozen=True)
class SafeguardInputs:
    """What the safeguards read from the base version: its Fisher (EWC) and its replay set (replay, distillation)."""

    fisher: dict[str, torch.Tensor] | None = None
    replay: list[Record] | None = None


def load_safeguard_inputs(
    model: nn.Module, directory: Path, manifest: Manifest, safeguards: SafeguardConfig
) -> SafeguardInputs:
    """The files `safeguards` needs from the version in `directory` (already sha256-verified against `manifest`),
    checked; SafeguardFilesError naming the file and what is wrong with it. `model` carries the adapters the Fisher
    must fit."""
    fisher = None
    if wants_fisher(safeguards):
        if FISHER_FILE_NAME not in manifest.files:
            raise SafeguardFilesError(
                f"the round asks for EWC (ewc_lambda={safeguards.ewc_lambda}) but version {manifest.version_id} ships "
                f"no {FISHER_FILE_NAME}; not training without it"
            )
        try:
            fisher = load_fisher_file(directory / FISHER_FILE_NAME, expected_version=manifest.version_id, model=model)
        except FisherFileError as error:
            raise SafeguardFilesError(
                f"the round asks for EWC but the version's Fisher is unusable: {error}"
            ) from error
    replay = None
    if wants_replay(safeguards) or safeguards.distill_weight > 0:
        path = directory / REPLAY_FILE_NAME
        if REPLAY_FILE_NAME not in manifest.files or not path.is_file():
            raise SafeguardFilesError(
                f"the round asks for replay or distillation but version {manifest.version_id} ships no "
                f"{REPLAY_FILE_NAME}; not training without it"
            )
        if path.stat().st_size > MAX_REPLAY_BYTES:
            raise SafeguardFilesError(
                f"{path}: {path.stat().st_size} bytes, over the {MAX_REPLAY_BYTES} a replay set may have"
            )
        try:
            replay = read_jsonl(path, strict=True).records
        except JsonlFormatError as error:
            raise SafeguardFilesError(f"the version's replay set is unusable: {error}") from error
    return SafeguardInputs(fisher=fisher, replay=replay)


def train_local_adapters(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    config: EdgeTrainConfig,
    inputs: SafeguardInputs | None = None,
) -> LocalTrainingResult:
    """Train the adapters already attached to `model` on `records`; returns the adapter tensors (detached copies,
    on CPU) and the routed-token counts. `inputs` feed `config.safeguards` (load_safeguard_inputs)."""
    if not records:
        raise ValueError("no training records: the local data files held no valid lines")
    started_at = datetime.now(UTC)
    # The id the training loop pads rows with (fednested.training.edge.train_adapters picks it the same way).
    pad_id = tokenizer.pad_token_id if isinstance(tokenizer.pad_token_id, int) else tokenizer.eos_token_id
    with count_routed_tokens(model, pad_id=pad_id if isinstance(pad_id, int) else None) as routed:
        metrics = train_adapters(
            model,
            tokenizer,
            records,
            config,
            fisher=inputs.fisher if inputs is not None else None,
            replay=inputs.replay if inputs is not None else None,
        )
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
