"""`fednested registry …`: registry commands for operators, with the control plane's settings (the same
DJANGO_SETTINGS_MODULE and environment as `manage.py`). Imported only when the group is invoked, so the core and
the edge client never import Django."""

import os
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="The registry of model versions and the artifact store.", no_args_is_help=True)


@app.callback()
def registry() -> None:
    """The registry of model versions and the artifact store (a group, also while it has one command)."""


@app.command("check-store")
def check_store(
    root: Annotated[
        Path | None,
        typer.Option(help="check this store instead of FEDNESTED_ARTIFACT_ROOT (e.g. a copy, before a move)"),
    ] = None,
) -> None:
    """Check the artifact store against the registry: every version file and update payload present, inside the
    store, with its size and sha256; lists files no row names. Exit status 1 on any error (`manage.py check_store`)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
    import django
    from django.core.management import CommandError, call_command

    django.setup()
    try:
        call_command("check_store", root=root)
    except CommandError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(error.returncode) from error
