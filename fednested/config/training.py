"""The edge training config, declared once: the tier2 YAML section `training:` and
`fednested.training.train_adapters` both read this dataclass.

It lives in the torch-free config package (not beside the training loop) because importing anything under
`fednested.training` runs that package's `__init__`, which imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from fednested.config.fields import SettingError, check_settings

Precision = Literal["auto", "fp32", "bf16"]


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
