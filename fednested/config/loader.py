"""Load a tier1/tier2 YAML config into its typed model; every error names the file, the line, the field and the
problem. Relative paths in a config are taken relative to the config file's directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import yaml
from pydantic import BaseModel, ValidationError

from fednested.config.fields import SettingError
from fednested.config.models import CONFIG_MODELS, ConfigKind, Tier1Config, Tier2Config


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config file."""

    line: int | None
    field: str | None
    message: str

    def render(self, path: Path) -> str:
        where = f"{path}:{self.line}" if self.line is not None else str(path)
        return f"{where}: field {self.field!r}: {self.message}" if self.field else f"{where}: {self.message}"


class ConfigError(ValueError):
    """A config file that cannot be used; `lines()` gives one "file:line: field 'x': problem" line per problem."""

    def __init__(self, path: Path, problems: list[ConfigProblem]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [problem.render(self.path) for problem in self.problems]


@overload
def load_config(path: str | os.PathLike[str], kind: Literal["tier1"]) -> Tier1Config: ...
@overload
def load_config(path: str | os.PathLike[str], kind: Literal["tier2"]) -> Tier2Config: ...
@overload
def load_config(path: str | os.PathLike[str], kind: None = None) -> Tier1Config | Tier2Config: ...
def load_config(path: str | os.PathLike[str], kind: ConfigKind | None = None) -> Tier1Config | Tier2Config:
    """Read, validate and resolve the config at `path`.

    `kind` is what the caller needs; the file's own `kind:` key must agree with it, and decides when `kind` is
    None. Raises ConfigError.
    """
    config_path = Path(path)
    text = _read(config_path)
    document, root = _parse(config_path, text)
    if not isinstance(document, dict):
        shown = "an empty file" if document is None else f"a {type(document).__name__}"
        raise ConfigError(config_path, [ConfigProblem(1, None, f"expected a mapping of settings, got {shown}")])
    declared = document.get("kind")
    if kind is not None and declared is not None and declared != kind:
        line = _line_of(root, ("kind",))
        raise ConfigError(config_path, [ConfigProblem(line, "kind", f"file says {declared!r} but {kind!r} is needed")])
    chosen = kind or declared
    if chosen not in CONFIG_MODELS:
        problem = (
            "missing: set kind: tier1 or kind: tier2 (or pass the kind explicitly)"
            if chosen is None
            else f"must be 'tier1' or 'tier2', got {chosen!r}"
        )
        raise ConfigError(config_path, [ConfigProblem(_line_of(root, ("kind",)), "kind", problem)])
    model = CONFIG_MODELS[chosen]
    try:
        config = model.model_validate(document)
    except ValidationError as error:
        problems = [_problem(root, item) for item in error.errors(include_url=False)]
        # In file order, so the list reads top to bottom alongside the file.
        raise ConfigError(config_path, sorted(problems, key=lambda problem: problem.line or 0)) from None
    resolved: Tier1Config | Tier2Config = _resolve_paths(config, config_path.parent.resolve())
    return resolved


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, [ConfigProblem(None, None, "config file not found")]) from None
    except IsADirectoryError:
        raise ConfigError(path, [ConfigProblem(None, None, "is a directory, not a config file")]) from None
    except UnicodeDecodeError as error:
        raise ConfigError(path, [ConfigProblem(None, None, f"not UTF-8 text (byte {error.start})")]) from None
    except OSError as error:
        raise ConfigError(path, [ConfigProblem(None, None, f"cannot read: {error.strerror}")]) from None


def _parse(path: Path, text: str) -> tuple[Any, yaml.Node | None]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        document = yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else None
        column = f", column {mark.column + 1}" if mark is not None else ""
        problem = error.problem or error.context or "invalid YAML"
        raise ConfigError(path, [ConfigProblem(line, None, f"YAML syntax error{column}: {problem}")]) from None
    except yaml.YAMLError as error:
        raise ConfigError(path, [ConfigProblem(None, None, f"YAML error: {error}")]) from None
    duplicates = list(_duplicate_keys(root))
    if duplicates:
        raise ConfigError(path, duplicates)
    return document, root


def _duplicate_keys(node: yaml.Node | None, prefix: str = "") -> list[ConfigProblem]:
    """PyYAML keeps the last of two equal keys silently; a config with both is almost always a mistake."""
    problems: list[ConfigProblem] = []
    if isinstance(node, yaml.MappingNode):
        first_seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in first_seen:
                message = f"duplicate key (first set on line {first_seen[key]})"
                problems.append(ConfigProblem(line, prefix + key, message))
            else:
                first_seen[key] = line
            problems.extend(_duplicate_keys(value_node, f"{prefix}{key}."))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems.extend(_duplicate_keys(item, f"{prefix.rstrip('.')}[{index}]."))
    return problems


def _walk(root: yaml.Node | None, loc: tuple[int | str, ...]) -> tuple[int | None, str]:
    """Follow a pydantic error location through the YAML tree: the line it points at and its dotted YAML path.

    Location parts absent from the file (a union's tag, a missing field) leave the walk at the parent, and
    only the last of them is kept in the path.
    """
    node = root
    line = root.start_mark.line + 1 if root is not None else None
    path = ""
    for position, part in enumerate(loc):
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if str(key_node.value) == str(part):
                    child, line = value_node, key_node.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is not None:
            node = child
            path += f"[{part}]" if isinstance(part, int) else f".{part}"
        elif position == len(loc) - 1:
            path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return line, path.lstrip(".")


def _line_of(root: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    return _walk(root, loc)[0]


def _problem(root: yaml.Node | None, item: Any) -> ConfigProblem:
    loc = tuple(part for part in item["loc"] if isinstance(part, int | str))
    kind = item["type"]
    context = item.get("ctx") or {}
    setting_error = context.get("error") if kind == "value_error" else None
    if kind in {"union_tag_not_found", "union_tag_invalid"}:
        # A tagged section (bus: kind: kafka|embedded): the problem is the tag key itself, not the whole section.
        loc = (*loc, str(context.get("discriminator", "kind")).strip("'"))
    elif isinstance(setting_error, SettingError) and setting_error.field is not None:
        # A dataclass section's own check (fednested.config.fields) names its field; point at that field's line.
        loc = (*loc, setting_error.field)
    line, field = _walk(root, loc)
    if kind in {"missing", "union_tag_not_found"}:
        message = "required setting is missing"
        if kind == "union_tag_not_found":
            message += " (kafka or embedded)"
    elif kind in {"extra_forbidden", "unexpected_keyword_argument"}:
        # extra_forbidden from a pydantic section, unexpected_keyword_argument from a dataclass section.
        message = "unknown setting (check the spelling; `fednested init-config` writes every valid one)"
    elif isinstance(setting_error, SettingError):
        message = setting_error.problem
    elif kind == "union_tag_invalid":
        message = f"must be one of {context.get('expected_tags')} (got {context.get('tag')!r})"
    else:
        message = str(item["msg"]).removeprefix("Value error, ")
        value = item.get("input")
        # Our own validators (value_error) already quote the offending values.
        if kind != "value_error" and not isinstance(value, dict | list) and len(repr(value)) <= 80:
            message += f" (got {value!r})"
    return ConfigProblem(line, field or None, message)


def _resolve_paths(model: Any, base: Path) -> Any:
    """A copy of `model` with every relative Path (also in lists and nested sections) made absolute under `base`."""
    if not isinstance(model, BaseModel):
        return model
    updates: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        resolved = _resolve_value(value, base)
        if resolved is not value:
            updates[name] = resolved
    return model.model_copy(update=updates) if updates else model


def _resolve_value(value: Any, base: Path) -> Any:
    if isinstance(value, Path):
        expanded = value.expanduser()
        return expanded if expanded.is_absolute() else base / expanded
    if isinstance(value, list):
        return [_resolve_value(item, base) for item in value]
    if isinstance(value, BaseModel):
        return _resolve_paths(value, base)
    return value
