"""Configuration of the two deployable roles: tier1 (cluster) and tier2 (edge device), loaded from YAML."""

from fednested.config.loader import ConfigError, ConfigProblem, load_config
from fednested.config.models import (
    CONFIG_MODELS,
    AdapterSettings,
    ConfigKind,
    EdgeDataSettings,
    EdgeModelSettings,
    EdgeTrainingSettings,
    RetrySettings,
    StorageSettings,
    Tier1Config,
    Tier1ModelSettings,
    Tier1TrainingSettings,
    Tier2Config,
)
from fednested.config.samples import render_sample

__all__ = [
    "CONFIG_MODELS",
    "AdapterSettings",
    "ConfigError",
    "ConfigKind",
    "ConfigProblem",
    "EdgeDataSettings",
    "EdgeModelSettings",
    "EdgeTrainingSettings",
    "RetrySettings",
    "StorageSettings",
    "Tier1Config",
    "Tier1ModelSettings",
    "Tier1TrainingSettings",
    "Tier2Config",
    "load_config",
    "render_sample",
]
