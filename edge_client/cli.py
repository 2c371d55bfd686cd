"""`fednested tier2 ...`: the edge device's commands (registered lazily by fednested.cli as the `tier2` group)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from edge_client.errors import EdgeClientError
from edge_client.runner import RunOptions, run_client
from edge_client.sidecar import AuditChainError, verify_chain
from fednested.config import ConfigError, load_config
from fednested.observability.tracing import EDGE_CLIENT, configure_tracing

# Exit status when --max-wait-s ran out before the run's goals were met (updates may still be in the spool).
EXIT_TIMED_OUT = 2

app = typer.Typer(
    name="tier2",
    help="Edge device (Tier-2/3): enroll, follow the champion, train adapters, send deltas through the sidecar.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _fail(message: str) -> typer.Exit:
    for line in message.splitlines():
        typer.echo(f"error: {line}", err=True)
    return typer.Exit(code=1)


@app.command("run-client")
def run_client_command(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="tier2 config file (see `fednested init-config tier2`).")
    ],
    rounds: Annotated[
        int | None, typer.Option(help="Stop after this many updates were delivered (one per base version).")
    ] = None,
    until_version: Annotated[
        str | None, typer.Option(help="Stop once this version is loaded and reported to the control plane.")
    ] = None,
    max_wait_s: Annotated[
        float | None, typer.Option(help="Give up after this many seconds; exit status 2 if goals were not met.")
    ] = None,
    report_json: Annotated[bool, typer.Option("--json", help="Print the run report as JSON on stdout.")] = False,
) -> None:
    """Run the edge client. Without --rounds/--until-version it runs until interrupted."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        # Spans go to OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT when set (the exporter package must then be installed).
        configure_tracing(EDGE_CLIENT)
        tier2 = load_config(config, "tier2")
        options = RunOptions(rounds=rounds, until_version=until_version, max_wait_s=max_wait_s)
        report = run_client(tier2, options)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    except (EdgeClientError, ValueError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(json.dumps(asdict(report), indent=2) if report_json else report.summary())
    for update_id, reason in report.updates_failed:
        typer.echo(
            f"error: update {update_id} was not sent and is kept in the spool's failed/ directory: {reason}", err=True
        )
    if report.updates_failed:
        raise typer.Exit(code=1)
    if report.stopped_because == "max_wait":
        raise typer.Exit(code=EXIT_TIMED_OUT)


@app.command("verify-audit")
def verify_audit_command(
    path: Annotated[Path, typer.Argument(help="The device's audit log (audit_log_path in the tier2 config).")],
) -> None:
    """Check the local audit log's hash chain; names the first line that was edited, deleted or reordered."""
    try:
        chain = verify_chain(path)
    except AuditChainError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{path}: {chain.entries} entries, chain intact, head {chain.head_hash}")
