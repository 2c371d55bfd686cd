"""Per-expert LoRA adapters on the fused expert FFN weights, injected through PEFT; the base stays frozen."""

# PEFT 0.21 reaches fused 3-D expert tensors only through `LoraConfig.target_parameters` (`lora.ParamWrapper`), which
# gives every expert of a targeted tensor an adapter (no per-expert selection) and folds `W + s·B·A` for the whole
# stack into the parameter on every forward, so the backward computes a dense gradient for all experts. We keep PEFT's
# machinery (injection, freezing, adapter switching, PeftModel) and register our own LoRA layer for the experts module
# through PEFT's custom-module API: it holds factors only for the selected experts and computes LoRA on the tokens
# routed to each expert (see `fednested.adapters.routed`). docs/adr/0002-edge-quantization.md has the details.
#
# What leaves a device is `adapter_state_dict`: per-expert factors under stable keys
# `<base param name>/expert=<e>/lora_A` ([r, in]) and `.../lora_B` ([out, r]), independent of PEFT's internal layout.

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Literal, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from torch import nn
from transformers import PreTrainedModel

from fednested.adapters.routed import (
    FrozenExpertLinear,
    StackedLora,
    expert_shape,
    num_experts,
    routed_experts_forward,
)
from fednested.config.adapter import EXPERT_TARGETS

# The config and its error are declared in the torch-free config package (the tier2 YAML section `adapter:` is this
# dataclass); re-exported here, where the adapters are attached from it.
from fednested.config.adapter import AdapterError as AdapterError
from fednested.config.adapter import ExpertLoraConfig as ExpertLoraConfig

LoraFactor = Literal["lora_A", "lora_B"]
LORA_FACTORS: tuple[LoraFactor, ...] = ("lora_A", "lora_B")
_ADAPTER_KEY = re.compile(r"^(?P<param>.+)/expert=(?P<expert>\d+)/(?P<factor>lora_A|lora_B)$")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_CONFIG_ATTRIBUTE = "_fednested_expert_lora_config"


def adapter_key(param_name: str, expert: int, factor: LoraFactor) -> str:
    """Wire name of one expert's LoRA factor, e.g. "model.layers.0.mlp.experts.down_proj/expert=3/lora_A"."""
    return f"{param_name}/expert={expert}/{factor}"


def parse_adapter_key(key: str) -> tuple[str, int, LoraFactor]:
    """(base parameter name, expert index, "lora_A" | "lora_B") of a wire key, or AdapterError naming it."""
    match = _ADAPTER_KEY.match(key)
    if match is None:
        raise AdapterError(f"adapter tensor {key!r} is not named '<param>/expert=<e>/lora_A|lora_B'")
    factor: LoraFactor = "lora_A" if match.group("factor") == "lora_A" else "lora_B"
    return match.group("param"), int(match.group("expert")), factor


def layer_index(module_name: str) -> int:
    match = _LAYER_INDEX.search(module_name + ".")
    if match is None:
        raise AdapterError(f"{module_name!r} is not inside a decoder layer ('layers.<i>.')")
    return int(match.group(1))


class ExpertLoraLayer(nn.Module, LoraLayer):
    """PEFT LoRA layer around a fused expert stack: factors for selected experts only, LoRA on routed tokens.

    lora_A[adapter][target]: [n_selected, r, in]; lora_B[adapter][target]: [n_selected, out, r]. Adapters are kept
    in fp32 even on a bf16 or quantized base (optimizer state stays precise); compute follows the activations.
    """

    other_param_names = (*LoraLayer.other_param_names, "lora_experts", "lora_targets")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: float = 1,
        *,
        fednested_config: ExpertLoraConfig,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.lora_experts: dict[str, tuple[int, ...]] = {}
        self.lora_targets: dict[str, tuple[str, ...]] = {}
        target_name = kwargs.pop("target_name", "")
        for unused in ("parameter_name", "tied_adapter", "loaded_in_8bit", "loaded_in_4bit", "device_map"):
            kwargs.pop(unused, None)
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.module_name: str = target_name
        # see fednested.adapters.routed.set_expert_recompute
        self.recompute_activations = False
        self.layer_index: int = layer_index(target_name)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, config, fednested_config=fednested_config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        _, out_features, in_features = expert_shape(module, EXPERT_TARGETS[0])
        return in_features, out_features

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        config: LoraConfig,
        *,
        fednested_config: ExpertLoraConfig | None = None,
        **kwargs: Any,
    ) -> None:
        if fednested_config is None:
            raise AdapterError("expert adapters are added through fednested.adapters.attach_expert_adapters")
        base = self.get_base_layer()
        total = num_experts(base)
        selected = tuple(fednested_config.experts) if fednested_config.experts is not None else tuple(range(total))
        if selected and selected[-1] >= total:
            raise AdapterError(
                f"ExpertLoraConfig.experts asks for expert {selected[-1]} but {self.module_name} has {total} experts"
            )
        generator = torch.Generator().manual_seed(fednested_config.init_seed * 1_000_003 + self.layer_index)
        lora_a = nn.ParameterDict()
        lora_b = nn.ParameterDict()
        for target in fednested_config.targets:
            _, out_features, in_features = expert_shape(base, target)
            # PEFT's default LoRA init: A ~ kaiming-uniform(a=√5) = U(±1/√in), B = 0, so ΔW starts at exactly 0
            bound = 1.0 / math.sqrt(in_features)
            initial_a = (torch.rand(len(selected), r, in_features, generator=generator) * 2 - 1) * bound
            lora_a[target] = nn.Parameter(initial_a)
            lora_b[target] = nn.Parameter(torch.zeros(len(selected), out_features, r))
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = float(lora_alpha) / r
        self.lora_dropout[adapter_name] = nn.Dropout(p=config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.lora_A[adapter_name] = lora_a
        self.lora_B[adapter_name] = lora_b
        self.use_rslora[adapter_name] = False
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        self.lora_experts[adapter_name] = selected
        self.lora_targets[adapter_name] = tuple(fednested_config.targets)
        device = _device_of(base)
        if device is not None:
            self.lora_A[adapter_name].to(device)
            self.lora_B[adapter_name].to(device)
        self.set_adapter(self.active_adapters)

    def _active_loras(self) -> dict[str, list[StackedLora]]:
        loras: dict[str, list[StackedLora]] = {}
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            dropout = self.lora_dropout[adapter]
            dropout_module = None if isinstance(dropout, nn.Identity) else dropout
            factors_a = _factors(self.lora_A, adapter)
            factors_b = _factors(self.lora_B, adapter)
            for target in self.lora_targets[adapter]:
                loras.setdefault(target, []).append(
                    StackedLora(
                        self.lora_experts[adapter],
                        factors_a[target],
                        factors_b[target],
                        float(self.scaling[adapter]),
                        dropout_module,
                    )
                )
        return loras

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        if self.disable_adapters or self.merged or not any(a in self.lora_A for a in self.active_adapters):
            result = base(hidden_states, *args, **kwargs)
            assert isinstance(result, torch.Tensor)
            return result
        top_k_index, top_k_weights = _routing_args(args, kwargs)
        return routed_experts_forward(
            base,
            hidden_states,
            top_k_index,
            top_k_weights,
            self._active_loras(),
            recompute=self.recompute_activations,
        )

    def delta_weight(self, adapter_name: str, target: str) -> torch.Tensor:
        """Dense fp32 ΔW for every selected expert of `target`: [n_selected, out, in] = scale · B · A."""
        lora_a = _factors(self.lora_A, adapter_name)[target].detach().float()
        lora_b = _factors(self.lora_B, adapter_name)[target].detach().float()
        scale = float(self.scaling[adapter_name])
        return torch.bmm(lora_b, lora_a) * scale

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base = self.get_base_layer()
        if isinstance(base, FrozenExpertLinear):
            raise AdapterError(
                f"{self.module_name}: cannot merge adapters into a quantized base; take fednested.deltas.expert_deltas"
                " and merge them into the full-precision model with merge_expert_deltas"
            )
        for adapter in adapter_names if adapter_names is not None else self.active_adapters:
            if adapter not in self.lora_A or adapter in self.merged_adapters:
                continue
            self._add_delta(adapter, sign=1.0, check_finite=safe_merge)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._add_delta(self.merged_adapters.pop(), sign=-1.0, check_finite=False)

    def _add_delta(self, adapter: str, *, sign: float, check_finite: bool) -> None:
        base = self.get_base_layer()
        index = torch.tensor(self.lora_experts[adapter], dtype=torch.long)
        with torch.no_grad():
            for target in self.lora_targets[adapter]:
                weight = getattr(base, target)
                delta = self.delta_weight(adapter, target).to(weight.device)
                updated = weight[index].float() + sign * delta
                if check_finite and not torch.isfinite(updated).all():
                    raise AdapterError(
                        f"{self.module_name}.{target}: merging adapter {adapter!r} gives non-finite weights"
                    )
                weight[index] = updated.to(weight.dtype)


def _factors(container: nn.ModuleDict, adapter: str) -> nn.ParameterDict:
    factors = container[adapter]
    assert isinstance(factors, nn.ParameterDict)
    return factors


def _factor_stacks(layer: ExpertLoraLayer, adapter: str, target: str) -> list[tuple[LoraFactor, torch.Tensor]]:
    return [("lora_A", _factors(layer.lora_A, adapter)[target]), ("lora_B", _factors(layer.lora_B, adapter)[target])]


def _routing_args(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    values = list(args[:2])
    for name in ("top_k_index", "top_k_weights")[len(values) :]:
        if name not in kwargs:
            raise TypeError(f"expert stack called without {name}")
        values.append(kwargs[name])
    index, weights = values
    assert isinstance(index, torch.Tensor)
    assert isinstance(weights, torch.Tensor)
    return index, weights


def _device_of(module: nn.Module) -> torch.device | None:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return None


def expert_stacks(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> fused expert stack (fp or quantized) for every MoE layer of a plain or PEFT-wrapped model."""
    stacks: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpertLoraLayer):
            stacks[module.module_name] = module
        elif _is_expert_stack(name, module):
            stacks[_strip_peft_prefix(name)] = module
    return dict(sorted(stacks.items(), key=lambda item: layer_index(item[0])))


def _is_expert_stack(name: str, module: nn.Module) -> bool:
    if not name.endswith(".mlp.experts") or ".base_layer" in name or isinstance(module, nn.ModuleList):
        return False
    if isinstance(module, FrozenExpertLinear):
        return True
    return all(isinstance(getattr(module, target, None), torch.Tensor) for target in EXPERT_TARGETS)


def _strip_peft_prefix(name: str) -> str:
    prefix = "base_model.model."
    return name[len(prefix) :] if name.startswith(prefix) else name


def attach_expert_adapters(model: nn.Module, config: ExpertLoraConfig) -> PeftModel:
    """Wrap `model` in a PeftModel with per-expert LoRA on the chosen layers/experts/targets; everything else frozen.

    Works on a full-precision or a `fednested.quantization.quantize_base` model. The model is modified in place.
    """
    if isinstance(model, PeftModel):
        raise AdapterError("model already carries adapters; attach to the plain base model")
    stacks = expert_stacks(model)
    if not stacks:
        raise AdapterError(f"{type(model).__name__} has no fused MoE expert stacks ('<...>.mlp.experts') to adapt")
    by_layer = {layer_index(name): name for name in stacks}
    chosen = sorted(by_layer) if config.layers is None else list(config.layers)
    missing = [i for i in chosen if i not in by_layer]
    if missing:
        raise AdapterError(f"ExpertLoraConfig.layers asks for layer(s) {missing}; MoE layers are {sorted(by_layer)}")
    for name in (by_layer[i] for i in chosen):
        total = num_experts(stacks[name])
        if config.experts is not None and config.experts[-1] >= total:
            raise AdapterError(f"ExpertLoraConfig.experts asks for expert {config.experts[-1]}; {name} has {total}")
    lora_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,  # type: ignore[arg-type]
        lora_dropout=config.dropout,
        # full module names, not a regex: PEFT rewrites regex targets of transformers-5 MoE models (v4->v5 weight
        # conversion) into bare leaf names such as "experts", which would adapt every layer
        target_modules=[by_layer[i] for i in chosen],
        bias="none",
        task_type="CAUSAL_LM",
    )
    factory = functools.partial(ExpertLoraLayer, fednested_config=config)
    # PEFT calls the mapped value like a class: factory(target, adapter_name, config=..., r=..., ...)
    custom_layers: dict[type[nn.Module], Any] = {type(stacks[by_layer[i]]): factory for i in chosen}
    lora_config._register_custom_module(custom_layers)
    # PEFT casts adapters to the base dtype unless told otherwise; fp32 adapters keep small updates from rounding away
    with warnings.catch_warnings():
        # PEFT 0.21 still asks transformers 5 for the renamed `is_gradient_checkpointing`; nothing for us to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(
            cast(PreTrainedModel, model), lora_config, adapter_name=config.adapter_name, autocast_adapter_dtype=False
        )
    setattr(peft_model, _CONFIG_ATTRIBUTE, config)
    return peft_model


def expert_lora_layers(model: nn.Module) -> list[ExpertLoraLayer]:
    """The expert LoRA layers of a model, in layer order."""
    layers = [m for m in model.modules() if isinstance(m, ExpertLoraLayer)]
    return sorted(layers, key=lambda layer: layer.layer_index)


def expert_lora_config(model: nn.Module) -> ExpertLoraConfig:
    """The ExpertLoraConfig the adapters of `model` were attached with."""
    config = getattr(model, _CONFIG_ATTRIBUTE, None)
    if not isinstance(config, ExpertLoraConfig):
        raise AdapterError("model has no expert adapters; call attach_expert_adapters first")
    return config


def _layers_or_error(model: nn.Module) -> list[ExpertLoraLayer]:
    layers = expert_lora_layers(model)
    if not layers:
        raise AdapterError("model has no expert adapters; call attach_expert_adapters first")
    return layers


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors only (what leaves a device), per expert, as detached fp32 copies under wire keys."""
    state: dict[str, torch.Tensor] = {}
    for layer in _layers_or_error(model):
        adapter = adapter_name or layer.active_adapters[0]
        if adapter not in layer.lora_A:
            raise AdapterError(f"{layer.module_name} has no adapter named {adapter!r}")
        for target in layer.lora_targets[adapter]:
            param_name = f"{layer.module_name}.{target}"
            for slot, expert in enumerate(layer.lora_experts[adapter]):
                for factor, stacked in _factor_stacks(layer, adapter, target):
                    key = adapter_key(param_name, expert, factor)
                    state[key] = stacked[slot].detach().to("cpu", torch.float32).clone().contiguous()
    return state


def expected_adapter_shapes(model: nn.Module, adapter_name: str | None = None) -> dict[str, tuple[int, ...]]:
    """Wire key -> shape for every adapter tensor the model carries."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in _layers_or_error(model):
        adapter = adapter_name or layer.active_adapters[0]
        for target in layer.lora_targets[adapter]:
            for factor, stacked in _factor_stacks(layer, adapter, target):
                for slot, expert in enumerate(layer.lora_experts[adapter]):
                    key = adapter_key(f"{layer.module_name}.{target}", expert, factor)
                    shapes[key] = tuple(stacked[slot].shape)
    return shapes


def load_adapter_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], adapter_name: str | None = None
) -> None:
    """Copy wire-keyed adapter tensors into the model's adapters; the key set and shapes must match exactly."""
    expected = expected_adapter_shapes(model, adapter_name)
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unknown:
        raise AdapterError(f"adapter tensor(s) {unknown[:5]} do not exist on this model ({len(unknown)} unknown)")
    if missing:
        raise AdapterError(f"adapter tensor(s) {missing[:5]} are missing ({len(missing)} missing)")
    for key, tensor in state.items():
        if tuple(tensor.shape) != expected[key]:
            raise AdapterError(f"adapter tensor {key!r} has shape {list(tensor.shape)}, expected {list(expected[key])}")
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"adapter tensor {key!r} holds NaN or infinite values")
    by_module = {layer.module_name: layer for layer in expert_lora_layers(model)}
    with torch.no_grad():
        for key, tensor in state.items():
            param_name, expert, factor = parse_adapter_key(key)
            module_name, _, target = param_name.rpartition(".")
            layer = by_module[module_name]
            adapter = adapter_name or layer.active_adapters[0]
            slot = layer.lora_experts[adapter].index(expert)
            container = layer.lora_A if factor == "lora_A" else layer.lora_B
            stacked = _factors(container, adapter)[target]
            stacked[slot].copy_(tensor.to(stacked.dtype))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with requires_grad (after attach: the adapter factors only) — what an optimizer should get."""
    return [p for p in model.parameters() if p.requires_grad]


def iter_base_parameters(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) of every base parameter and buffer of a PEFT-wrapped model, adapters excluded."""
    for name, tensor in model.state_dict(keep_vars=True).items():
        if ".lora_" not in name:
            yield name, tensor
