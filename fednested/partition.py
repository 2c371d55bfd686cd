"""Which partition every parameter belongs to: the core, one expert (layer, index), or a layer's gate."""

# Fused 3-D expert tensors (transformers 5 stores a layer's experts as one [E, out, in] parameter) are split along the
# expert dimension, so each slice belongs to its own expert. The map is plain data and travels in manifests.

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

PartitionKind = Literal["core", "expert", "gate"]
_KINDS: tuple[PartitionKind, ...] = ("core", "expert", "gate")

# Layer index anywhere in a decoder parameter name ("model.layers.3.mlp.gate.weight").
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# A MoE block's router: "<...>.mlp.gate.weight" (not "gate_proj" or "gate_up_proj", hence the trailing dot).
_ROUTER = re.compile(r"\.mlp\.gate\.")
# Qwen2-MoE's sigmoid gate in front of the shared expert: it gates, so it is gate, not core.
_SHARED_EXPERT_GATE = re.compile(r"\.mlp\.shared_expert_gate\.")
# Fused expert stacks: "<...>.mlp.experts.gate_up_proj" / ".down_proj" (3-D, expert dimension first).
_FUSED_EXPERTS = re.compile(r"\.mlp\.experts\.[A-Za-z_]+$")
# One module per expert (older layouts): "<...>.mlp.experts.3.w1.weight".
_PER_EXPERT_MODULE = re.compile(r"\.mlp\.experts\.(\d+)\.")


class PartitionError(ValueError):
    """A model or serialized map that cannot be partitioned as core / expert / gate (says which parameter)."""


@dataclass(frozen=True, order=True)
class PartitionKey:
    """One partition: the single core, the gate of a layer, or expert `expert` of a layer."""

    kind: PartitionKind
    layer: int | None = None
    expert: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise PartitionError(f"partition kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "core" and (self.layer is not None or self.expert is not None):
            raise PartitionError("the core partition has no layer or expert")
        if self.kind == "gate" and (self.layer is None or self.expert is not None):
            raise PartitionError("a gate partition needs a layer and no expert")
        if self.kind == "expert" and (self.layer is None or self.expert is None):
            raise PartitionError("an expert partition needs both a layer and an expert index")

    def __str__(self) -> str:
        if self.kind == "core":
            return "core"
        if self.kind == "gate":
            return f"gate/layer={self.layer}"
        return f"expert/layer={self.layer}/expert={self.expert}"

    @classmethod
    def parse(cls, text: str) -> PartitionKey:
        """Inverse of `str(key)`: "core", "gate/layer=3" or "expert/layer=3/expert=5"."""
        parts = text.split("/")
        fields: dict[str, int] = {}
        for part in parts[1:]:
            name, _, value = part.partition("=")
            if name not in ("layer", "expert") or not value.isdigit():
                raise PartitionError(f"malformed partition key {text!r}")
            fields[name] = int(value)
        kind = parts[0]
        if kind not in _KINDS:
            raise PartitionError(f"malformed partition key {text!r}: kind must be one of {_KINDS}")
        return cls(kind, fields.get("layer"), fields.get("expert"))


CORE = PartitionKey("core")


@dataclass(frozen=True)
class ParamPartition:
    """Where one parameter goes: wholly to `key`, or (fused experts) slice i along dim 0 to expert(layer, i)."""

    shape: tuple[int, ...]
    key: PartitionKey | None = None
    expert_layer: int | None = None

    @property
    def is_fused_experts(self) -> bool:
        return self.key is None

    def partition_keys(self) -> list[PartitionKey]:
        """The partitions this parameter contributes to (one, or one per expert slice)."""
        if self.key is not None:
            return [self.key]
        return [PartitionKey("expert", self.expert_layer, e) for e in range(self.shape[0])]

    def numel_per_key(self) -> int:
        total = 1
        for size in self.shape:
            total *= size
        return total if self.key is not None else total // self.shape[0]


@dataclass(frozen=True)
class ParamRef:
    """A parameter, or one expert's slice of a fused parameter (index along dim 0)."""

    name: str
    expert_index: int | None = None


@dataclass
class PartitionMap:
    """Every parameter name -> its partition (or per-slice partitions); complete and disjoint by construction."""

    params: dict[str, ParamPartition] = field(default_factory=dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, name: str) -> ParamPartition:
        try:
            return self.params[name]
        except KeyError:
            raise PartitionError(f"parameter {name!r} is not in the partition map") from None

    def partition_of(self, name: str, expert_index: int | None = None) -> PartitionKey:
        """The partition of a parameter, or of slice `expert_index` of a fused expert parameter."""
        entry = self[name]
        if entry.key is not None:
            if expert_index is not None:
                raise PartitionError(f"{name!r} is not a fused expert tensor; it has no expert slices")
            return entry.key
        if expert_index is None or not 0 <= expert_index < entry.shape[0]:
            raise PartitionError(f"{name!r} is a fused expert tensor; give an expert index in [0, {entry.shape[0]})")
        return PartitionKey("expert", entry.expert_layer, expert_index)

    def partition_keys(self) -> list[PartitionKey]:
        """Every partition that holds at least one parameter, sorted (core, expert..., gate...)."""
        return sorted({key for entry in self.params.values() for key in entry.partition_keys()})

    def members(self, key: PartitionKey) -> list[ParamRef]:
        """The parameters (or expert slices) that make up partition `key`, in name order."""
        refs: list[ParamRef] = []
        for name in sorted(self.params):
            entry = self.params[name]
            if entry.key == key:
                refs.append(ParamRef(name))
            elif (
                entry.key is None
                and key.kind == "expert"
                and key.layer == entry.expert_layer
                and key.expert is not None
                and 0 <= key.expert < entry.shape[0]
            ):
                refs.append(ParamRef(name, key.expert))
        return refs

    def kind_of_file(self, name: str) -> PartitionKind:
        """The coarse partition (core / expert / gate) a whole tensor is stored under in a checkpoint."""
        entry = self[name]
        return "expert" if entry.key is None else entry.key.kind

    def names_of_kind(self, kind: PartitionKind) -> list[str]:
        return sorted(name for name in self.params if self.kind_of_file(name) == kind)

    def parameter_counts(self) -> dict[PartitionKey, int]:
        """Number of scalars per partition; they add up to `total_parameters()`."""
        counts: dict[PartitionKey, int] = {}
        for entry in self.params.values():
            for key in entry.partition_keys():
                counts[key] = counts.get(key, 0) + entry.numel_per_key()
        return dict(sorted(counts.items()))

    def counts_by_kind(self) -> dict[PartitionKind, int]:
        totals: dict[PartitionKind, int] = {kind: 0 for kind in _KINDS}
        for key, count in self.parameter_counts().items():
            totals[key.kind] += count
        return totals

    def total_parameters(self) -> int:
        return sum(self.parameter_counts().values())

    def expert_layers(self) -> dict[int, int]:
        """Layer index -> number of experts, for every MoE layer."""
        layers: dict[int, int] = {}
        for key in self.partition_keys():
            if key.kind == "expert" and key.layer is not None and key.expert is not None:
                layers[key.layer] = max(layers.get(key.layer, 0), key.expert + 1)
        return dict(sorted(layers.items()))

    def fused_expert_params(self, layer: int | None = None) -> dict[str, ParamPartition]:
        """Fused expert parameters (all layers, or one), name -> entry."""
        return {
            name: entry
            for name, entry in sorted(self.params.items())
            if entry.key is None and (layer is None or entry.expert_layer == layer)
        }

    def to_dict(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for name in sorted(self.params):
            entry = self.params[name]
            record: dict[str, Any] = {"shape": list(entry.shape)}
            if entry.key is None:
                record["fused_experts"] = {"layer": entry.expert_layer, "dim": 0}
            else:
                record["partition"] = str(entry.key)
            params[name] = record
        return {"format": "fednested.partition/1", "params": params}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PartitionMap:
        if data.get("format") != "fednested.partition/1":
            raise PartitionError(f"unknown partition map format {data.get('format')!r}")
        raw = data.get("params")
        if not isinstance(raw, Mapping):
            raise PartitionError("partition map has no 'params' object")
        params: dict[str, ParamPartition] = {}
        for name, record in raw.items():
            try:
                shape = tuple(int(size) for size in record["shape"])
                if "fused_experts" in record:
                    params[name] = ParamPartition(shape, None, int(record["fused_experts"]["layer"]))
                else:
                    params[name] = ParamPartition(shape, PartitionKey.parse(record["partition"]))
            except (KeyError, TypeError, ValueError) as error:
                raise PartitionError(f"partition map entry for {name!r} is malformed: {error}") from error
        return cls(params)

    @classmethod
    def from_json(cls, text: str) -> PartitionMap:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise PartitionError(f"partition map is not valid JSON: {error}") from error
        if not isinstance(data, dict):
            raise PartitionError("partition map JSON must be an object")
        return cls.from_dict(data)


def classify_parameter(name: str, shape: tuple[int, ...], num_experts: int | None) -> ParamPartition:
    """The partition of one parameter from its name and shape (the rules `partition_model` applies)."""
    layer_match = _LAYER.search(name)
    layer = int(layer_match.group(1)) if layer_match else None
    if layer is not None and (_ROUTER.search(name) or _SHARED_EXPERT_GATE.search(name)):
        return ParamPartition(shape, PartitionKey("gate", layer))
    if layer is not None and _FUSED_EXPERTS.search(name):
        if len(shape) != 3 or (num_experts is not None and shape[0] != num_experts):
            raise PartitionError(
                f"{name}: a fused expert tensor must be 3-D with {num_experts} experts first, got shape {list(shape)}"
            )
        return ParamPartition(shape, None, layer)
    per_expert = _PER_EXPERT_MODULE.search(name)
    if layer is not None and per_expert:
        return ParamPartition(shape, PartitionKey("expert", layer, int(per_expert.group(1))))
    return ParamPartition(shape, CORE)


def num_experts_of(model: nn.Module) -> int | None:
    """Routed experts per MoE layer from the model's config (families name it differently)."""
    config = getattr(model, "config", None)
    for attribute in ("num_local_experts", "num_experts"):
        value = getattr(config, attribute, None)
        if isinstance(value, int):
            return value
    return None


def partition_model(model: nn.Module) -> PartitionMap:
    """Partition every parameter of `model` (each shared tensor once, under its first name)."""
    num_experts = num_experts_of(model)
    params = {
        name: classify_parameter(name, tuple(param.shape), num_experts) for name, param in model.named_parameters()
    }
    if not params:
        raise PartitionError(f"{type(model).__name__} has no parameters to partition")
    return PartitionMap(params)
