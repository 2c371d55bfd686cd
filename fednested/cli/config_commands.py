"""`fednested init-config` and `fednested config validate`: write commented sample configs and check configs."""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from fednested.cli.errors import fail
from fednested.config import ConfigError, load_config, render_sample

config_app = typer.Typer(help="Check tier1/tier2 configuration files.", no_args_is_help=True)


class KindChoice(StrEnum):
    """The two configuration kinds, as CLI choices."""

    tier1 = "tier1"
    tier2 = "tier2"


def init_config(
    kind: Annotated[KindChoice, typer.Argument(help="tier1 (cluster) or tier2 (edge device).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write; prints to stdout when omitted.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUTPUT if it exists.")] = False,
) -> None:
    """Write a sample configuration with a comment explaining every setting."""
    text = render_sample(kind.value)
    if output is None:
        typer.echo(text, nl=False)
        return
    if output.is_dir():
        fail(f"{output}: is a directory; give a file name")
    if output.exists() and not force:
        fail(f"{output}: already exists; pass --force to overwrite it")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        # Written beside the target and renamed, so an interrupted write never leaves half a config.
        partial = output.with_name(f".{output.name}.partial")
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, output)
    except OSError as error:
        fail(f"{output}: cannot write: {error.strerror}")
    typer.echo(f"wrote {output}; check it with: fednested config validate {output} --kind {kind.value}")


@config_app.command("validate")
def validate_config(
    path: Annotated[Path, typer.Argument(help="Configuration file (YAML).")],
    kind: Annotated[
        KindChoice | None, typer.Option("--kind", help="Expected kind; defaults to the file's `kind:`.")
    ] = None,
) -> None:
    """Validate a configuration file: every problem is printed with its line and field."""
    try:
        config = load_config(path, kind.value if kind is not None else None)
    except ConfigError as error:
        fail(error.lines())
    typer.echo(f"{path}: valid {config.kind} configuration (bus: {config.bus.kind})")
