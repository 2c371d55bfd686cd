"""MoE causal LMs for fednested: named presets, supported families, local loading/saving, parameter counts."""

from fednested.models.fingerprint import count_parameters, model_fingerprint, tensor_sha256
from fednested.models.loading import ModelNotFoundError, load_model, save_model
from fednested.models.presets import (
    FAMILIES,
    PRESETS,
    Family,
    ModelPreset,
    UnknownPresetError,
    build_config,
    build_model,
    family_of,
    get_preset,
)

__all__ = [
    "FAMILIES",
    "PRESETS",
    "Family",
    "ModelNotFoundError",
    "ModelPreset",
    "UnknownPresetError",
    "build_config",
    "build_model",
    "count_parameters",
    "family_of",
    "get_preset",
    "load_model",
    "model_fingerprint",
    "save_model",
    "tensor_sha256",
]
