"""Commented sample configs, generated from the models themselves so that the sample always validates and every
setting is explained by its field description (a dataclass section's: the field's `metadata["help"]`)."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from fednested.config.fields import help_text
from fednested.config.models import CONFIG_MODELS, ConfigKind

HEADERS: dict[ConfigKind, str] = {
    "tier1": "fednested Tier-1 (cluster) configuration",
    "tier2": "fednested Tier-2/3 (edge device) configuration",
}
COMMENT_WIDTH = 118


def render_sample(kind: ConfigKind) -> str:
    """The sample YAML for `kind`: every setting with its default (or an example), each under a comment."""
    lines = [
        f"# {HEADERS[kind]}, written by `fednested init-config {kind}`.",
        f"# Check it with `fednested config validate PATH --kind {kind}`.",
        "# Relative paths are taken relative to the directory of this file.",
        "",
    ]
    lines.extend(_render_model(CONFIG_MODELS[kind], None, indent=0))
    return "\n".join(lines).rstrip("\n") + "\n"


def _sample_value(info: FieldInfo) -> Any:
    if info.default is not PydanticUndefined:
        return info.default
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    if info.examples:
        return info.examples[0]
    raise ValueError(f"field without default or example: {info}")  # caught by the sample tests


def _render_model(model: type[BaseModel], instance: BaseModel | None, indent: int) -> list[str]:
    lines: list[str] = []
    for name, info in model.model_fields.items():
        lines.extend(_comment(info.description, indent))
        lines.extend(_render_field(model, instance, name, info, " " * indent))
        if indent == 0:
            lines.append("")
    return lines


def _render_dataclass(instance: Any, indent: int) -> list[str]:
    """A dataclass section (ExpertLoraConfig, EdgeTrainConfig, RetryPolicy): its help texts and its values."""
    lines: list[str] = []
    for spec in dataclasses.fields(instance):
        lines.extend(_comment(help_text(spec), indent))
        lines.extend(_render_value(spec.name, getattr(instance, spec.name), " " * indent))
    return lines


def _comment(text: str | None, indent: int) -> list[str]:
    wrapped = textwrap.wrap(text, width=COMMENT_WIDTH - indent - 2) if text else []
    return [f"{' ' * indent}# {line}" for line in wrapped]


def _render_field(
    model: type[BaseModel], instance: BaseModel | None, name: str, info: FieldInfo, pad: str
) -> list[str]:
    section = info.annotation
    if instance is None and info.is_required() and isinstance(section, type) and issubclass(section, BaseModel):
        # A required section has no default instance: render its fields from their own defaults and examples.
        return [f"{pad}{name}:", *_render_model(section, None, len(pad) + 2)]
    value = getattr(instance, name) if instance is not None else _sample_value(info)
    return _render_value(name, value, pad)


def _render_value(name: str, value: Any, pad: str) -> list[str]:
    if isinstance(value, BaseModel):
        return [f"{pad}{name}:", *_render_model(type(value), value, len(pad) + 2)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [f"{pad}{name}:", *_render_dataclass(value, len(pad) + 2)]
    return [f"{pad}{name}: {_scalar(value)}"]


def _scalar(value: Any) -> str:
    """One-line YAML for a scalar, list or mapping (flow style), the way yaml.safe_load reads it back."""
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, list | tuple):
        value = [str(item) if isinstance(item, Path) else item for item in value]
    dumped = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return dumped.removesuffix("\n...").strip()
