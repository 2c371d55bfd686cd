"""The anti-forgetting safeguards inside one rank of a core update: EWC against the champion's Fisher, frozen expert
slices of the fused expert tensors held bitwise at the champion's values under DeepSpeed, distillation from a frozen
copy of the champion on its replay set, and that replay set mixed into the data.

Tensors frozen whole (layers, gates) never reach the optimizer (requires_grad off, `fednested.tier1.core_update`);
this module handles what cannot be switched off per tensor: a slice of a fused [experts, out, in] weight. The checks
ran in `fednested.tier1.plan.plan_safeguards`; here the rank only builds what the plan resolved.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fednested.data.encoding import EncodedExample, encode_records
from fednested.data.jsonl import read_jsonl
from fednested.data.packing import PackedBatch, iter_batches, pack_examples
from fednested.partition import partition_model
from fednested.tier1.plan import SafeguardPlan, file_sha256
from fednested.training.safeguards import (
    SafeguardError,
    distillation_loss,
    ewc_penalty,
    load_fisher_file,
    mix_replay,
    normalised_fisher,
    target_logits,
)


def _expert_tensors(model: nn.Module) -> list[str]:
    partition = partition_model(model)
    return sorted(name for name, _ in model.named_parameters() if partition.kind_of_file(name) == "expert")


def champion_snapshots(model: nn.Module, plan: SafeguardPlan) -> dict[str, torch.Tensor]:
    """fp32 copies, on the CPU, of the champion tensors the safeguards compare against or restore: the expert tensors
    EWC covers and the fused tensors with frozen slices. Taken before DeepSpeed casts the model (bf16) or moves it."""
    parameters = dict(model.named_parameters())
    names = {name for name, _ in plan.frozen_slices}
    if plan.fisher_path is not None:
        names.update(_expert_tensors(model))
    return {name: parameters[name].detach().to("cpu", torch.float32, copy=True) for name in sorted(names)}


def replay_examples(plan: SafeguardPlan, tokenizer: Any) -> list[EncodedExample]:
    """The champion's replay set, encoded with its tokenizer; empty when neither replay nor distillation is on. A file
    that changed since the launcher checked it is refused, as a dataset is."""
    if plan.replay_path is None:
        return []
    sha256, _ = file_sha256(Path(plan.replay_path))
    if sha256 != plan.replay_sha256:
        raise SafeguardError(
            f"replay set {plan.replay_path} changed after the launcher checked it (sha256 {sha256[:12]})"
        )
    return encode_records(read_jsonl(plan.replay_path, strict=True).records, tokenizer)


def mix_in_replay(
    plan: SafeguardPlan, examples: Sequence[EncodedExample], replay: Sequence[EncodedExample], seed: int
) -> list[EncodedExample]:
    """The training examples with `replay_fraction` of replay mixed in, the same on every rank (one seed; a generator
    of its own, apart from the one that shuffles the data)."""
    if plan.replay_fraction <= 0:
        return list(examples)
    return mix_replay(examples, replay, plan.replay_fraction, random.Random(f"replay:{seed}"))


def distillation_batches(
    replay: Sequence[EncodedExample], *, seq_len: int, rows: int, pad_id: int, rank: int, world_size: int
) -> Iterator[PackedBatch]:
    """This rank's replay micro-batches for the distillation term, cycled: dealt round-robin when there are enough
    for every rank, else every rank cycles all of them."""
    packed = pack_examples(list(replay), seq_len, pad_id=pad_id)
    batches = [batch for batch in iter_batches(packed, rows) if batch.target_tokens > 0]
    if not batches:
        raise SafeguardError("distill_weight is set but the champion's replay set holds no target tokens")
    mine = batches[rank::world_size] if len(batches) >= world_size else batches
    return itertools.cycle(mine)


@dataclass
class CoreSafeguards:
    """EWC, frozen expert slices and distillation for one rank's DeepSpeed engine, built after `deepspeed.initialize`.

    The EWC penalty λ/2·Σ F̂⊙(W − W_champion)² (F̂: the Fisher divided by its mean over the expert tensors, as on the
    edge) is computed on every rank from its whole weights (ZeRO 0-2 keep them whole on each rank); being the same on
    every rank, its gradient survives DeepSpeed's averaging over ranks unchanged.
    """

    plan: SafeguardPlan
    parameters: dict[str, nn.Parameter]
    anchors: dict[str, torch.Tensor]
    fisher: dict[str, torch.Tensor] | None
    slices: list[tuple[nn.Parameter, int, torch.Tensor]]
    teacher: nn.Module | None = None
    distill: Iterator[PackedBatch] | None = None
    replay_mixed: int = 0
    last_penalty: float | None = None
    last_distill: float | None = None
    _hooks: list[Any] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        plan: SafeguardPlan,
        module: nn.Module,
        snapshots: Mapping[str, torch.Tensor],
        *,
        champion_version: str,
        device: torch.device,
        teacher: nn.Module | None = None,
        distill: Iterator[PackedBatch] | None = None,
        replay_mixed: int = 0,
    ) -> CoreSafeguards:
        parameters = dict(module.named_parameters())
        fisher = None
        anchors: dict[str, torch.Tensor] = {}
        if plan.fisher_path is not None:
            # read again on the rank (the launcher checked the same sha256-verified file): the tensors are not sent
            loaded = load_fisher_file(plan.fisher_path, expected_version=champion_version, model=module)
            # EWC covers the expert weights; a Fisher estimated with "experts+core" also holds core tensors
            names = [name for name in _expert_tensors(module) if name in loaded]
            fisher = {name: tensor.to(device) for name, tensor in normalised_fisher(loaded, names).items()}
            anchors = {name: snapshots[name].to(device) for name in names}
        slices = [(parameters[name], expert, snapshots[name][expert].to(device)) for name, expert in plan.frozen_slices]
        guards = cls(
            plan=plan,
            parameters=parameters,
            anchors=anchors,
            fisher=fisher,
            slices=slices,
            teacher=teacher,
            distill=distill,
            replay_mixed=replay_mixed,
        )
        guards._mask_frozen_gradients()
        return guards

    def _mask_frozen_gradients(self) -> None:
        """Zero the frozen experts' rows of each gradient before DeepSpeed sees it (a tensor hook runs before the
        gradient is accumulated and reduced), so clipping and AdamW's moments never see them."""
        by_parameter: dict[int, tuple[nn.Parameter, list[int]]] = {}
        for parameter, expert, _ in self.slices:
            by_parameter.setdefault(id(parameter), (parameter, []))[1].append(expert)
        for parameter, experts in by_parameter.values():
            index = torch.tensor(sorted(experts), dtype=torch.long, device=parameter.device)

            def mask(grad: torch.Tensor, index: torch.Tensor = index) -> torch.Tensor:
                masked = grad.clone()
                masked[index] = 0
                return masked

            self._hooks.append(parameter.register_hook(mask))  # type: ignore[no-untyped-call]  # torch leaves it untyped

    def penalty(self) -> torch.Tensor | None:
        """The EWC term of this optimizer step (differentiable in the weights); None when EWC is off."""
        if self.fisher is None:
            return None
        deltas = {name: self.parameters[name].float() - anchor for name, anchor in self.anchors.items()}
        value = ewc_penalty(deltas, self.fisher, strength=self.plan.ewc_lambda)
        self.last_penalty = float(value.detach())
        return value

    def distillation(self, module: nn.Module, device: torch.device) -> torch.Tensor | None:
        """The distillation term of this step, `distill_weight · T²·KL(champion ‖ model)` on the next replay
        micro-batch, with the champion's logits from the frozen copy; None when distillation is off."""
        if self.teacher is None or self.distill is None:
            return None
        batch = next(self.distill).to(device)
        with torch.no_grad():
            teacher = target_logits(self.teacher, batch)
        student = target_logits(module, batch)
        loss = distillation_loss(student, teacher, temperature=self.plan.distill_temperature)
        self.last_distill = float(loss.detach())
        if not torch.isfinite(loss.detach()):
            raise SafeguardError("the distillation term is not finite; lower distill_temperature or check the data")
        return loss * self.plan.distill_weight

    @torch.no_grad()
    def restore(self) -> None:
        """Put the frozen slices back after an optimizer step, in the model's weights and in DeepSpeed's fp32 master
        copy: AdamW's decoupled weight decay moves a weight even at zero gradient, and ZeRO 1/2 would copy a moved
        master back over the model at the next step. Each rank writes only the part of the master it owns."""
        for parameter, expert, snapshot in self.slices:
            parameter.data[expert].copy_(snapshot.to(parameter.dtype))
            mapping = getattr(parameter, "_hp_mapping", None)
            if mapping is None:
                continue  # ZeRO 0 in fp32 (the optimizer steps the model's own weights) or a part another rank owns
            row = snapshot.numel()
            owned_start = mapping.lp_fragment_address.start
            owned_end = owned_start + mapping.lp_fragment_address.numel
            start, end = max(owned_start, expert * row), min(owned_end, (expert + 1) * row)
            if start < end:
                master = mapping.get_hp_fragment()
                master.view(-1)[start - owned_start : end - owned_start].copy_(
                    snapshot.reshape(-1)[start - expert * row : end - expert * row]
                )

    def lineage(self) -> dict[str, Any]:
        """What ran, for the candidate's lineage."""
        record: dict[str, Any] = {
            "config": self.plan.config,
            "frozen_tensors": self.plan.frozen_tensors,
            "frozen_slices": [[name, expert] for name, expert in self.plan.frozen_slices],
            "ewc": None,
            "replay": None,
            "distillation": None,
        }
        if self.plan.replay_fraction > 0:
            record["replay"] = {
                "fraction": self.plan.replay_fraction,
                "file": {"path": self.plan.replay_path, "sha256": self.plan.replay_sha256},
                "records_mixed": self.replay_mixed,
            }
        if self.teacher is not None:
            record["distillation"] = {
                "weight": self.plan.distill_weight,
                "temperature": self.plan.distill_temperature,
                "file": {"path": self.plan.replay_path, "sha256": self.plan.replay_sha256},
                "loss_last": self.last_distill,
            }
        if self.fisher is not None:
            record["ewc"] = {
                "lambda": self.plan.ewc_lambda,
                "fisher": {"path": self.plan.fisher_path, "sha256": self.plan.fisher_sha256},
                "tensors": sorted(self.fisher),
                "penalty_last": self.last_penalty,
            }
        return record
