"""Settings declared once: a config dataclass field carries its default, its bounds and its help text in
`field(default=..., metadata={"help": ..., "minimum": ...})`; `check_settings` enforces the bounds however the dataclass
is built (in Python, or from YAML through pydantic), and the sample writer prints the help text as a comment.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Sized
from typing import Any

HELP = "help"
MIN_ITEMS = "min_items"
# Bound key in a field's metadata -> (test the value must pass against the limit, how a violation reads). The keys
# are JSON Schema's words, not pydantic's (ge, gt, ...): pydantic reads its own words from a dataclass field's
# metadata and would check the bounds a second time with other messages; here is the one place they are checked.
BOUNDS: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "minimum": (operator.ge, "must be at least {}"),
    "exclusive_minimum": (operator.gt, "must be greater than {}"),
    "maximum": (operator.le, "must be at most {}"),
    "exclusive_maximum": (operator.lt, "must be less than {}"),
}
METADATA_KEYS = frozenset({HELP, MIN_ITEMS, *BOUNDS})


class SettingError(ValueError):
    """A config value outside its bounds. `field` names the setting (None for a rule over several) and `problem`
    says what is wrong and what was given; the YAML loader reports both as "file:line: field 'section.field': ..."."""

    def __init__(self, config: str, field: str | None, problem: str) -> None:
        self.config = config
        self.field = field
        self.problem = problem
        super().__init__(f"{config}.{field} {problem}" if field else f"{config}: {problem}")


def help_text(spec: dataclasses.Field[Any]) -> str:
    """The help text of a config dataclass field (its sample comment)."""
    text = spec.metadata.get(HELP)
    if not isinstance(text, str) or not text:
        raise TypeError(f"config field {spec.name!r} has no metadata={{'help': ...}}")  # caught by the sample tests
    return text


def check_settings(config: Any, error: type[SettingError] = SettingError) -> None:
    """Raise `error` for the first field of the dataclass `config` whose value breaks a bound in its metadata.

    None passes: it means "not set" for the optional settings, and a None given to a required one is a type error
    that pydantic (YAML) and mypy (Python) report.
    """
    owner = type(config).__name__
    for spec in dataclasses.fields(config):
        unknown = set(spec.metadata) - METADATA_KEYS
        if unknown:
            raise TypeError(f"{owner}.{spec.name}: unknown metadata key(s) {sorted(unknown)}")
        value = getattr(config, spec.name)
        if value is None:
            continue
        bounds = [(key, limit) for key, limit in spec.metadata.items() if key in BOUNDS]
        if bounds:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise error(owner, spec.name, f"must be a number, got {value!r}")
            if not math.isfinite(value):
                raise error(owner, spec.name, f"must be a finite number, got {value!r}")
        for key, limit in bounds:
            test, problem = BOUNDS[key]
            if not test(value, limit):
                raise error(owner, spec.name, f"{problem.format(limit)}, got {value!r}")
        min_items = spec.metadata.get(MIN_ITEMS)
        if min_items is not None and isinstance(value, Sized) and len(value) < min_items:
            raise error(owner, spec.name, f"must have at least {min_items} item(s), got {value!r}")
