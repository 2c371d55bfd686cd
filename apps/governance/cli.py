"""`fednested audit …`: the tamper-evident audit trail for operators, with the control plane's settings (the same
DJANGO_SETTINGS_MODULE and environment as `manage.py`). Imported only when the group is invoked, so the core and the
edge client never import Django."""

import json
import os
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="The audit trail's hash chain: verify, seal, anchor.", no_args_is_help=True)

AnchorOption = Annotated[
    Path | None, typer.Option(help="the anchor file (default: FEDNESTED_AUDIT_ANCHOR_FILE of the control plane)")
]


def _setup() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
    import django

    django.setup()


@app.command("verify")
def verify(
    anchors: AnchorOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Recompute every link of the audit chain and check the anchors; names the first broken link. Exit status 1
    when the chain is broken, 0 when it holds (events not sealed yet are listed as a warning)."""
    _setup()
    from apps.governance.chain import AnchorFileError, verify_chain

    try:
        report = verify_chain(anchors)
    except AnchorFileError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        state = "holds" if report.ok else "is BROKEN"
        typer.echo(
            f"audit chain {state}: {report.events} sealed event(s), head seq {report.head_seq} "
            f"{report.head_hash[:16]}…, {report.anchors_checked} anchor(s) checked, {report.unsealed} unsealed"
        )
        for warning in report.warnings:
            typer.echo(f"warning: {warning}")
        if report.broken:
            typer.echo(f"first broken link: {report.broken}", err=True)
    if not report.ok:
        raise typer.Exit(1)


@app.command("seal")
def seal() -> None:
    """Seal the events not yet in the chain (normally done right after each audited transaction commits)."""
    _setup()
    from apps.governance.chain import seal_pending

    typer.echo(f"sealed {seal_pending()} event(s)")


@app.command("anchor")
def anchor(anchors: AnchorOption = None) -> None:
    """Seal what is pending, then append the chain head to the anchor file (a copy kept off this machine is what
    makes a rewritten chain detectable)."""
    _setup()
    from apps.governance.chain import anchor_chain, seal_pending

    seal_pending()
    written = anchor_chain(anchors)
    if written is None:
        typer.echo("nothing to anchor: the chain is empty")
    else:
        typer.echo(f"anchored seq {written.seq} {written.hash} at {written.at}")


@app.command("verify-export")
def verify_export_file(
    path: Annotated[Path, typer.Argument(help="a JSON Lines export of the audit trail (console or API)")],
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Check an audit export without the database: every sealed event against its own hash, consecutive events
    linked. Exit status 1 when a line does not verify (each one is named), 2 when the file cannot be read."""
    _setup()
    from apps.governance.export import verify_export

    try:
        with path.open("rb") as lines:
            report = verify_export(lines, source=str(path))
    except OSError as error:
        typer.echo(f"error: {path}: {error.strerror or error}", err=True)
        raise typer.Exit(2) from error
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        typer.echo(
            f"{path}: {report.verified} of {report.lines} event(s) verified in {report.stretches} stretch(es) of the "
            f"chain, {report.unsealed} unsealed"
        )
        for problem in report.problems:
            typer.echo(f"problem: {problem}", err=True)
    if not report.ok:
        raise typer.Exit(1)
