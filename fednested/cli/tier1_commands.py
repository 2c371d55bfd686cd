"""`fednested tier1 ...`: data-centre (Tier-1) jobs run from the command line, without the web server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fednested.cli.errors import fail
from fednested.config import ConfigError, load_config

tier1_app = typer.Typer(help="Tier-1 (data centre) jobs: core updates under DeepSpeed.", no_args_is_help=True)


@tier1_app.command("core-update")
def core_update_command(
    config: Annotated[Path, typer.Option("--config", help="tier1 config: training, core_update and storage.")],
    edge_base: Annotated[
        Path | None,
        typer.Option("--edge-base", metavar="DIR", help="Version directory of the last core update (dW_edges base)."),
    ] = None,
    edge_aggregate: Annotated[
        list[Path] | None,
        typer.Option(
            "--edge-aggregate",
            metavar="DIR",
            help="Edge-aggregate version applied since the last core update; repeat, oldest first.",
        ),
    ] = None,
    version_id: Annotated[
        str | None, typer.Option("--version-id", help="Id of the candidate version; generated when omitted.")
    ] = None,
) -> None:
    """Train the champion's core and experts with DeepSpeed on `training.ranks` ranks and write a candidate version."""
    try:
        settings = load_config(config, "tier1")
    except ConfigError as error:
        fail(error.lines())
    # imported here: `fednested --help` and the other commands should not pay for torch
    from fednested.tier1 import CoreUpdateError, run_core_update

    try:
        result = run_core_update(
            settings, edge_base=edge_base, edge_aggregates=list(edge_aggregate or []), version_id=version_id
        )
    except CoreUpdateError as error:
        fail(str(error).splitlines())
    metrics = result.metrics
    typer.echo(f"candidate {result.version_id} written to {result.version_dir}")
    typer.echo(
        f"{metrics['steps']} steps on {result.lineage['deepspeed']['ranks']} ranks, loss {metrics['loss_first']:.4f} "
        f"-> {metrics['loss_last']:.4f}, {metrics['tokens_per_s']:.0f} tokens/s; run files in {result.run_dir}"
    )
    typer.echo(json.dumps(result.lineage, indent=2, sort_keys=True))
