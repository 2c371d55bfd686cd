"""The one error type of checkpoint loading: which file, and what is wrong with it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

CheckpointProblem = Literal[
    "missing",
    "truncated",
    "corrupt",
    "sha256 mismatch",
    "other architecture",
    "other shapes",
    "other base version",
    "other version",
    "invalid",
    "exists",
]


class CheckpointError(ValueError):
    """A version or update directory that cannot be used; `path` names the file, `problem` says what is wrong.

    `reason` is the category (missing, truncated, corrupt, sha256 mismatch, other architecture, other shapes,
    other base version, other version, invalid, exists), for callers that branch on it.
    """

    def __init__(self, path: str | Path, reason: CheckpointProblem, detail: str = "") -> None:
        self.path = Path(path)
        self.reason: CheckpointProblem = reason
        self.problem = f"{reason}: {detail}" if detail else reason
        super().__init__(f"{self.path}: {self.problem}")
