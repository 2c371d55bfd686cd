"""How CLI commands report a failure: one `error: ...` line per problem on stderr, then exit status 1."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NoReturn

import typer


def fail(problems: str | Iterable[str]) -> NoReturn:
    """Print each problem as `error: <problem>` on stderr and exit with status 1."""
    for line in [problems] if isinstance(problems, str) else problems:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code=1)
