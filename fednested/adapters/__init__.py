"""Per-expert LoRA adapters on fused MoE expert weights (through PEFT) and the routed-token expert forward."""

from fednested.adapters.lora import (
    AdapterError,
    ExpertLoraConfig,
    ExpertLoraLayer,
    adapter_key,
    adapter_state_dict,
    attach_expert_adapters,
    expected_adapter_shapes,
    expert_lora_config,
    expert_lora_layers,
    expert_stacks,
    load_adapter_state_dict,
    parse_adapter_key,
    trainable_parameters,
)
from fednested.adapters.routed import (
    FrozenExpertLinear,
    routed_experts_forward,
    set_expert_recompute,
)
from fednested.config.adapter import EXPERT_TARGETS

__all__ = [
    "EXPERT_TARGETS",
    "AdapterError",
    "ExpertLoraConfig",
    "ExpertLoraLayer",
    "FrozenExpertLinear",
    "adapter_key",
    "adapter_state_dict",
    "attach_expert_adapters",
    "expected_adapter_shapes",
    "expert_lora_config",
    "expert_lora_layers",
    "expert_stacks",
    "load_adapter_state_dict",
    "parse_adapter_key",
    "routed_experts_forward",
    "set_expert_recompute",
    "trainable_parameters",
]
