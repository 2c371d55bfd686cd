"""The `fednested` command: built-in sub-commands plus command groups that live in optional packages (the edge
client's `tier2`) and are imported only when invoked, so the core never imports them."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass

import typer
from typer.main import get_command

from fednested.cli.config_commands import config_app, init_config
from fednested.cli.errors import fail
from fednested.cli.identity_commands import ca_app
from fednested.cli.infra_commands import infra_app
from fednested.cli.interop_commands import export_app, import_app
from fednested.cli.messaging_commands import messaging_app
from fednested.cli.policy_commands import policy_app
from fednested.cli.tier1_commands import tier1_app


@dataclass(frozen=True)
class LazyCommandGroup:
    """A command group provided by `module.attribute` (a typer.Typer), imported on first use."""

    name: str
    module: str
    attribute: str
    help: str
    missing_hint: str


# Add a package's commands here: one line, and the package is imported only when its command runs.
LAZY_GROUPS: tuple[LazyCommandGroup, ...] = (
    LazyCommandGroup(
        name="tier2",
        module="edge_client.cli",
        attribute="app",
        help="Edge device (Tier-2/3) commands, e.g. `fednested tier2 run-client --config edge.yaml`.",
        missing_hint="install the edge client: pip install 'fednested[edge]'",
    ),
    LazyCommandGroup(
        name="registry",
        module="apps.registry.cli",
        attribute="app",
        help="Control-plane registry commands, e.g. `fednested registry check-store` (needs the control plane).",
        missing_hint="run it where the control plane is installed (pip install 'fednested[controlplane]')",
    ),
    LazyCommandGroup(
        name="audit",
        module="apps.governance.cli",
        attribute="app",
        help="The audit trail's hash chain, e.g. `fednested audit verify` (needs the control plane).",
        missing_hint="run it where the control plane is installed (pip install 'fednested[controlplane]')",
    ),
)


def load_lazy_group(group: LazyCommandGroup) -> typer.Typer:
    """Import the group's module and return its Typer app; exits with a clear error if it is not installed."""
    try:
        module = importlib.import_module(group.module)
    except ModuleNotFoundError as error:
        if error.name is not None and (group.module == error.name or group.module.startswith(f"{error.name}.")):
            fail(f"`fednested {group.name}` needs {group.module}, which is not installed; {group.missing_hint}")
        fail(f"`fednested {group.name}`: {group.module} cannot be imported: {error}; {group.missing_hint}")
    target = getattr(module, group.attribute, None)
    if not isinstance(target, typer.Typer):
        fail(f"`fednested {group.name}`: {group.module}.{group.attribute} is not a Typer app")
    return target


def _add_lazy_group(app: typer.Typer, group: LazyCommandGroup) -> None:
    # Everything after the group name, --help included, goes to the group's own command line parser.
    settings = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}

    @app.command(group.name, help=group.help, context_settings=settings, add_help_option=False)
    def run_group(ctx: typer.Context) -> None:
        command = get_command(load_lazy_group(group))
        command.main(args=list(ctx.args), prog_name=f"{ctx.find_root().info_name} {group.name}", standalone_mode=True)


def build_app(lazy_groups: Sequence[LazyCommandGroup] = LAZY_GROUPS) -> typer.Typer:
    """The root command with its built-in sub-commands and `lazy_groups`."""
    app = typer.Typer(
        name="fednested",
        help="Federated, multi-timescale training of Mixture-of-Experts LMs: configs, event bus, roles.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    app.command("init-config")(init_config)
    app.add_typer(config_app, name="config")
    app.add_typer(messaging_app, name="messaging")
    app.add_typer(tier1_app, name="tier1")
    app.add_typer(ca_app, name="ca")
    app.add_typer(infra_app, name="infra")
    app.add_typer(import_app, name="import")
    app.add_typer(export_app, name="export")
    app.add_typer(policy_app, name="policy")
    for group in lazy_groups:
        _add_lazy_group(app, group)
    return app


app = build_app()


def main() -> None:
    """Console-script entry point (`fednested`), also behind `python -m fednested`."""
    app(prog_name="fednested")
