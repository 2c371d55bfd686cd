"""The per-expert LoRA adapter config, declared once: the tier2 YAML section `adapter:`, update manifests and
`fednested.adapters.attach_expert_adapters` all read this dataclass.

It lives in the torch-free config package (not beside the adapters) because importing anything under
`fednested.adapters` runs that package's `__init__`, which imports torch and PEFT.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from fednested.config.fields import SettingError, check_settings

# The fused expert tensors of transformers 5 MoE families, gate_up_proj [E, 2I, H] and down_proj [E, H, I]: the only
# targets an expert adapter can have. fednested.adapters.routed imports them from here.
EXPERT_TARGETS: tuple[str, ...] = ("gate_up_proj", "down_proj")
# PEFT's name for the one adapter fednested attaches per model (internal, see ExpertLoraConfig.adapter_name).
ADAPTER_NAME = "default"


class AdapterError(ValueError):
    """Adapter tensors or settings that do not fit the model (the message names the key or field)."""


class AdapterSettingError(AdapterError, SettingError):
    """An ExpertLoraConfig value outside its bounds: an AdapterError that also names the field for the YAML loader."""


@dataclass(frozen=True)
class ExpertLoraConfig:
    """Which expert FFN weights get LoRA, and how: ΔW_e = (alpha / rank) · B_e · A_e.

    init_seed: A is drawn from a generator seeded per layer, so the same config gives the same initial adapters.
    """

    rank: int = field(default=8, metadata={"help": "LoRA rank r.", "minimum": 1, "maximum": 1024})
    alpha: float = field(
        default=16.0,
        metadata={"help": "LoRA scaling numerator; the delta is scaled by alpha / rank.", "exclusive_minimum": 0},
    )
    dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the adapter input during training.", "minimum": 0, "exclusive_maximum": 1},
    )
    layers: list[int] | None = field(
        default=None, metadata={"help": "MoE layer indexes to adapt; null adapts every MoE layer.", "min_items": 1}
    )
    experts: list[int] | None = field(
        default=None, metadata={"help": "Expert indexes to adapt; null adapts every expert.", "min_items": 1}
    )
    targets: tuple[str, ...] = field(
        default=EXPERT_TARGETS,
        metadata={"help": f"Expert weight tensors that get adapters ({', '.join(EXPERT_TARGETS)}).", "min_items": 1},
    )
    init_seed: int = field(
        default=0, metadata={"help": "Seed for the initial A matrices (same seed, same adapters).", "minimum": 0}
    )

    def __post_init__(self) -> None:
        # Normalised once, on a frozen instance: the same selection always reads (and is recorded) the same way.
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.layers is not None:
            object.__setattr__(self, "layers", sorted({int(i) for i in self.layers}))
        if self.experts is not None:
            object.__setattr__(self, "experts", sorted({int(i) for i in self.experts}))
        self.validate()

    def validate(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            raise AdapterSettingError("ExpertLoraConfig", "rank", f"must be an integer, got {self.rank!r}")
        check_settings(self, AdapterSettingError)
        unknown = [target for target in self.targets if target not in EXPERT_TARGETS]
        if unknown:
            raise AdapterSettingError(
                "ExpertLoraConfig", "targets", f"must be a non-empty subset of {EXPERT_TARGETS}, got {unknown}"
            )
        for name, indexes in (("layers", self.layers), ("experts", self.experts)):
            if indexes and min(indexes) < 0:
                raise AdapterSettingError("ExpertLoraConfig", name, f"must be non-negative indexes, got {indexes}")

    @property
    def adapter_name(self) -> str:
        # Internal, not a setting: fednested attaches one adapter per model, under PEFT's default name, so there is
        # nothing for a device's YAML or a manifest to choose.
        return ADAPTER_NAME

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExpertLoraConfig:
        values = dict(data)
        # Manifests written while the adapter name was a field carry PEFT's default name; any other is unknown.
        if values.get("adapter_name") == ADAPTER_NAME:
            del values["adapter_name"]
        unknown = sorted(set(values) - {spec.name for spec in fields(cls)})
        if unknown:
            raise AdapterError(f"unknown ExpertLoraConfig field(s) {unknown}")
        if "targets" in values:
            values["targets"] = tuple(values["targets"])
        try:
            return cls(**values)
        except TypeError as error:
            raise AdapterError(f"malformed ExpertLoraConfig: {error}") from error
