"""Loading and saving whole models from local directories only; nothing is ever fetched from a hub."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from fednested.models.presets import family_of


class ModelNotFoundError(FileNotFoundError):
    """The path is missing, or is not a directory holding a saved model (config.json plus weights)."""


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _check_model_dir(directory: Path) -> None:
    if not directory.exists():
        raise ModelNotFoundError(
            f"model directory {directory} does not exist; build one with fednested.models.build_model and "
            "save_model, or point at a local directory that holds config.json and model.safetensors"
        )
    if not directory.is_dir():
        raise ModelNotFoundError(f"{directory} is a file, not a model directory (expected config.json + weights)")
    if not (directory / "config.json").is_file():
        raise ModelNotFoundError(f"{directory} is not a model directory: config.json is missing")
    if not any((directory / name).is_file() for name in _WEIGHT_FILES):
        raise ModelNotFoundError(
            f"{directory} is not a model directory: no weights ({' or '.join(_WEIGHT_FILES)}) next to config.json"
        )


def load_model(path: str | Path, *, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The model saved in the local directory `path` (by `save_model` or `save_pretrained`), in eval mode.

    Only supported MoE families load; anything else is refused with the family list. `dtype` casts on load.
    """
    directory = Path(path)
    _check_model_dir(directory)
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    family_of(config)
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        directory, local_files_only=True, dtype=dtype if dtype is not None else torch.float32
    )
    nn.Module.eval(model)
    return model


def save_model(model: PreTrainedModel, path: str | Path) -> None:
    """config.json + model.safetensors in `path` (created if needed), loadable by `load_model`."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
