"""`fednested policy ...`: check a Ranger-format dataset policy file, ask it for one decision, convert it between
Ranger's export and list layouts, and push it to a Ranger admin (docs/dataset-policies.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

import typer

from fednested.cli.errors import fail
from fednested.governance.ranger import (
    ACCESS_TYPES,
    PRIORITY_OVERRIDE,
    SERVICE_DEF,
    AccessPolicy,
    PolicyFileError,
    Principal,
    decide,
    load_policy_file,
    write_policy_file,
)

# `decide` exits with this status when access is denied (1 stays "the command failed"), so scripts can branch on it.
EXIT_DENIED = 3

policy_app = typer.Typer(
    help="Ranger-format dataset access policies: check, decide, convert, push.", no_args_is_help=True
)

PolicyFile = Annotated[Path, typer.Argument(help="Ranger policy JSON: admin's export, a list, or one policy.")]


def _load(path: Path) -> tuple[AccessPolicy, ...]:
    try:
        return load_policy_file(path)
    except PolicyFileError as error:
        fail(str(error))


@policy_app.command("check")
def check_command(file: PolicyFile) -> None:
    """Read FILE as the evaluator would and list its policies; exits 1 naming the JSON path of the first problem."""
    policies = _load(file)
    enabled = sum(policy.is_enabled for policy in policies)
    typer.echo(f"{file}: {len(policies)} policies ({enabled} enabled) for service type {SERVICE_DEF['name']}")
    for policy in policies:
        flags = [
            "override" if policy.policy_priority == PRIORITY_OVERRIDE else "normal",
            "enabled" if policy.is_enabled else "disabled",
        ]
        if policy.is_deny_all_else:
            flags.append("deny-all-else")
        values = sorted(
            {value for resource_set in policy.resource_sets for spec in resource_set.values() for value in spec.values}
        )
        typer.echo(f"  {policy.label}: {', '.join(flags)}; datasets {', '.join(values)}")


@policy_app.command("decide")
def decide_command(
    file: PolicyFile,
    user: Annotated[str, typer.Option("--user", help="The principal's user name (a job's service principal).")],
    resource: Annotated[str, typer.Option("--resource", metavar="PATH", help="Dataset path, e.g. /tier1/med/a.jsonl")],
    access: Annotated[str, typer.Option("--access", help=f"One of {', '.join(ACCESS_TYPES)}.")] = "read",
    group: Annotated[list[str] | None, typer.Option("--group", help="A group of the user (repeatable).")] = None,
    role: Annotated[list[str] | None, typer.Option("--role", help="A role of the user (repeatable).")] = None,
) -> None:
    """Print the decision for one request as JSON (outcome, deciding policy and item, reason); exit status 0 when
    allowed, 3 when denied."""
    policies = _load(file)
    try:
        principal = Principal(user=user, groups=frozenset(group or ()), roles=frozenset(role or ()))
        decision = decide(policies, principal, resource, access)
    except ValueError as error:
        fail(str(error))
    typer.echo(json.dumps(decision.to_json(), indent=2))
    if not decision.allowed:
        raise typer.Exit(code=EXIT_DENIED)


@policy_app.command("convert")
def convert_command(
    file: PolicyFile,
    out: Annotated[Path, typer.Option("--out", help="Where to write the policies.")],
    layout: Annotated[
        str, typer.Option("--layout", help="`export` (Ranger admin's import/export file) or `list` (bare list).")
    ] = "export",
) -> None:
    """Check FILE and write its policies to OUT in Ranger's export layout or as a bare list."""
    if layout not in ("export", "list"):
        fail(f"--layout {layout!r}: use export or list")
    chosen: Literal["export", "list"] = "export" if layout == "export" else "list"
    policies = _load(file)
    write_policy_file(out, policies, layout=chosen)
    typer.echo(f"wrote {len(policies)} policies to {out} ({layout} layout)")


@policy_app.command("service-def")
def service_def_command() -> None:
    """Print the `fednested` service-def as JSON, to register in Ranger admin before pushing policies."""
    typer.echo(json.dumps(SERVICE_DEF, indent=2))


@policy_app.command("push")
def push_command(
    file: PolicyFile,
    url: Annotated[str, typer.Option("--url", help="Ranger admin, e.g. https://ranger.example.org:6182")],
    user: Annotated[str, typer.Option("--user", help="Ranger admin user allowed to create policies.")],
    password_env: Annotated[
        str, typer.Option("--password-env", metavar="NAME", help="Environment variable holding the password.")
    ],
    service: Annotated[
        str | None, typer.Option("--service", help="Ranger service to push to (default: each policy's `service`).")
    ] = None,
    timeout_s: Annotated[float, typer.Option("--timeout", min=1.0, help="Seconds to wait for each answer.")] = 30.0,
) -> None:
    """Create or update FILE's policies in a Ranger admin (matched by service and name)."""
    password = os.environ.get(password_env)
    if not password:
        fail(f"--password-env {password_env}: that environment variable is not set or empty")
    policies = _load(file)
    # Imported here: the Ranger client is an optional dependency (requirements/governance.txt) only push needs.
    try:
        from fednested.governance.ranger_admin import RangerAdminError, push_policies
    except ModuleNotFoundError as error:
        hint = "pip install -r requirements/governance.txt"
        fail(f"pushing needs the apache-ranger client ({error.name} is missing): {hint}")
    try:
        pushed = push_policies(
            policies, url=url, username=user, password=password, service=service, timeout_s=timeout_s
        )
    except RangerAdminError as error:
        fail(str(error))
    for entry in pushed:
        typer.echo(f"pushed {entry.name!r}: Ranger admin id {entry.admin_id}")
