"""The edge training config, declared once: the tier2 YAML section `training:` and
`fednested.training.train_adapters` both read this dataclass.

It lives in the torch-free config package (not beside the training loop) because importing anything under
`fednested.training` runs that package's `__init__`, which imports torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, get_args

from fednested.config.fields import SettingError, check_settings

Precision = Literal["auto", "fp32", "bf16"]


# What `SafeguardConfig.freeze_experts` entries look like: "<layer>:<expert>", the decoder layer and the expert index.
FROZEN_EXPERT_PATTERN = re.compile(r"^(\d+):(\d+)$")


def parse_frozen_expert(entry: str) -> tuple[int, int]:
    """(layer, expert) of a `freeze_experts` entry such as "1:3"; ValueError naming the entry otherwise."""
    match = FROZEN_EXPERT_PATTERN.match(entry.strip())
    if match is None:
        raise ValueError(f"freeze_experts entry {entry!r} is not '<layer>:<expert>' (e.g. '1:3')")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class SafeguardConfig:
    """Anti-forgetting safeguards of a training run, each off at its default (docs/forgetting-and-promotion-gate.md,
    "Safeguards in training"). The edge loop (`fednested.training.train_adapters`) reads all of them; the functions in
    `fednested.training.safeguards` work on named parameter deltas so a full-weight (Tier-1) loop can use them too."""

    ewc_lambda: float = field(
        default=0.0,
        metadata={
            "help": "EWC strength λ of the penalty λ/2·Σ F·ΔW² on the experts' weight deltas, with the parent "
            "version's diagonal Fisher (its fisher.safetensors) divided by its mean; 0 turns EWC off. Training "
            "refuses to start when λ > 0 and the version has no usable Fisher file.",
            "minimum": 0,
        },
    )
    freeze_layers: tuple[int, ...] = field(
        default=(),
        metadata={"help": "Decoder layers (indices from 0) whose expert adapters get no update."},
    )
    freeze_experts: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Experts whose adapters get no update, as '<layer>:<expert>' strings (e.g. '1:3')."},
    )
    freeze_gate: bool = field(
        default=False,
        metadata={
            "help": "Freeze the router (gate) weights. Full-weight training only: edge training never updates the "
            "gate, so an edge run that sets this refuses to start rather than pretend to honour it."
        },
    )
    distill_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the distillation term KL(champion ‖ model) on one replay micro-batch per step; the "
            "champion on the edge is the frozen base (adapters disabled). 0 turns it off; > 0 needs replay records.",
            "minimum": 0,
        },
    )
    distill_temperature: float = field(
        default=2.0,
        metadata={"help": "Softmax temperature T of the distillation term (the term is scaled by T²).", "minimum": 0.1},
    )
    replay_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Share of the training records drawn from the federation's replay set (public or synthetic "
            "records), mixed into the local data; 0 turns replay off, > 0 needs replay records.",
            "minimum": 0,
            "exclusive_maximum": 1,
        },
    )

    def __post_init__(self) -> None:
        check_settings(self)
        for layer in self.freeze_layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise SettingError("SafeguardConfig", "freeze_layers", f"must be layer indices >= 0, got {layer!r}")
        for entry in self.freeze_experts:
            try:
                parse_frozen_expert(entry)
            except ValueError as error:
                raise SettingError("SafeguardConfig", "freeze_experts", str(error)) from None

    @property
    def frozen_experts(self) -> frozenset[tuple[int, int]]:
        """(layer, expert) pairs named by `freeze_experts`."""
        return frozenset(parse_frozen_expert(entry) for entry in self.freeze_experts)

    @property
    def any_enabled(self) -> bool:
        """Whether any safeguard changes training (all off: the loop runs exactly as without safeguards)."""
        return bool(
            self.ewc_lambda > 0
            or self.freeze_layers
            or self.freeze_experts
            or self.freeze_gate
            or self.distill_weight > 0
            or self.replay_fraction > 0
        )


@dataclass(frozen=True)
class EdgeTrainConfig:
    """Everything that decides an edge training run; `max_steps`, `max_epochs` and `max_seconds` are budgets and
    the first one reached ends the run (at least one must be set)."""

    seq_len: int = field(default=256, metadata={"help": "Tokens per training row.", "minimum": 8})
    rows_per_batch: int = field(default=4, metadata={"help": "Rows per micro-batch.", "minimum": 1})
    grad_accum_steps: int = field(
        default=1, metadata={"help": "Micro-batches accumulated per optimizer step.", "minimum": 1}
    )
    learning_rate: float = field(
        default=2e-3, metadata={"help": "AdamW learning rate of the adapters.", "exclusive_minimum": 0}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay.", "minimum": 0})
    adam_betas: tuple[float, float] = field(
        default=(0.9, 0.999),
        metadata={
            "help": "AdamW betas: decay rates of the running gradient mean and squared gradient, each in [0, 1)."
        },
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear learning-rate warm-up steps.", "minimum": 0})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Gradient clipping norm; null disables it.", "exclusive_minimum": 0}
    )
    max_steps: int | None = field(
        default=100, metadata={"help": "Optimizer steps per run; null for no step limit.", "minimum": 1}
    )
    max_epochs: float | None = field(
        default=None, metadata={"help": "Passes over the data per run; null: no limit.", "exclusive_minimum": 0}
    )
    max_seconds: float | None = field(
        default=None, metadata={"help": "Wall-clock budget per run; null: no limit.", "exclusive_minimum": 0}
    )
    seed: int = field(default=0, metadata={"help": "Seed for data order and dropout.", "minimum": 0})
    precision: Precision = field(
        default="auto",
        metadata={"help": "auto: bf16 autocast on CUDA, fp32 on CPU (measured faster there, docs/benchmarks.md)."},
    )
    num_threads: int | None = field(
        default=None, metadata={"help": "CPU threads for training; null: PyTorch default.", "minimum": 1}
    )
    recompute_experts: bool = field(
        default=False,
        metadata={
            "help": "Recompute expert FFN activations in the backward instead of keeping them: about a third more "
            "expert compute for most of the activation memory (what decides peak memory on a small device once the "
            "base is quantized)."
        },
    )
    safeguards: SafeguardConfig = field(
        default_factory=SafeguardConfig,
        metadata={"help": "Anti-forgetting safeguards (EWC, freezing, distillation, replay); all off by default."},
    )

    def __post_init__(self) -> None:
        check_settings(self)
        if self.max_steps is None and self.max_epochs is None and self.max_seconds is None:
            raise SettingError(
                "EdgeTrainConfig",
                None,
                "set at least one budget (max_steps, max_epochs or max_seconds), or a run never ends",
            )
        if len(self.adam_betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.adam_betas):
            raise SettingError("EdgeTrainConfig", "adam_betas", f"must be two numbers in [0, 1), got {self.adam_betas}")
        if self.precision not in get_args(Precision):
            choices = ", ".join(get_args(Precision))
            raise SettingError("EdgeTrainConfig", "precision", f"must be one of {choices}, got {self.precision!r}")
