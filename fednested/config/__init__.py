"""Configuration of the two deployable roles: tier1 (cluster) and tier2 (edge device), loaded from YAML, and the
edge dataclasses (adapters, training, retries) that the tier2 config holds as they are."""

from fednested.config.adapter import AdapterError, ExpertLoraConfig
from fednested.config.fields import SettingError
from fednested.config.loader import ConfigError, ConfigProblem, load_config
from fednested.config.models import (
    CONFIG_MODELS,
    ConfigKind,
    EdgeDataSettings,
    EdgeModelSettings,
    StorageSettings,
    Tier1Config,
    Tier1ModelSettings,
    Tier1TrainingSettings,
    Tier2Config,
)
from fednested.config.retry import RetryPolicy
from fednested.config.samples import render_sample
from fednested.config.training import EdgeTrainConfig

__all__ = [
    "CONFIG_MODELS",
    "AdapterError",
    "ConfigError",
    "ConfigKind",
    "ConfigProblem",
    "EdgeDataSettings",
    "EdgeModelSettings",
    "EdgeTrainConfig",
    "ExpertLoraConfig",
    "RetryPolicy",
    "SettingError",
    "StorageSettings",
    "Tier1Config",
    "Tier1ModelSettings",
    "Tier1TrainingSettings",
    "Tier2Config",
    "load_config",
    "render_sample",
]
