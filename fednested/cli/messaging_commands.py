"""`fednested messaging ...`: operate the event bus (create and align its topics, apply Kafka's ACLs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from fednested.cli.errors import fail
from fednested.config import ConfigError, load_config
from fednested.messaging import BusError, EmbeddedBusSettings, KafkaBusSettings, bootstrap_topics
from fednested.messaging.schemas import describe_validation_error
from fednested.messaging.topics import TopicsConfig

messaging_app = typer.Typer(help="Operate the event bus.", no_args_is_help=True)


@messaging_app.command("bootstrap-topics")
def bootstrap_topics_command(
    config: Annotated[
        Path | None, typer.Option("--config", help="tier1/tier2 config whose `bus` section names the bus.")
    ] = None,
    bootstrap: Annotated[
        str | None, typer.Option("--bootstrap", metavar="HOST:PORT", help="Kafka brokers, default topic settings.")
    ] = None,
    embedded: Annotated[
        Path | None, typer.Option("--embedded", metavar="PATH", help="Embedded bus file, default topic settings.")
    ] = None,
) -> None:
    """Create the four topics with their partitions and retention, or align existing ones. Safe to re-run."""
    chosen = [
        name for name, value in (("--config", config), ("--bootstrap", bootstrap), ("--embedded", embedded)) if value
    ]
    if len(chosen) != 1:
        given = f" (got {' and '.join(chosen)})" if chosen else ""
        fail(f"give exactly one of --config PATH, --bootstrap HOST:PORT, --embedded PATH{given}")
    settings: KafkaBusSettings | EmbeddedBusSettings
    try:
        if config is not None:
            settings = load_config(config).bus
        elif bootstrap is not None:
            settings = KafkaBusSettings(bootstrap_servers=bootstrap)
        else:
            assert embedded is not None
            settings = EmbeddedBusSettings(path=embedded)
    except ConfigError as error:
        fail(error.lines())
    except ValidationError as error:
        option = "--bootstrap" if bootstrap is not None else "--embedded"
        fail(f"{option}: {problem}" for problem in describe_validation_error(error))
    try:
        report = bootstrap_topics(settings)
    except BusError as error:
        fail(str(error))
    for line in report.lines():
        typer.echo(line)


@messaging_app.command("apply-acls")
def apply_acls_command(
    config: Annotated[
        Path | None, typer.Option("--config", help="tier1/tier2 config whose `bus` section names the Kafka bus.")
    ] = None,
    bootstrap: Annotated[
        str | None, typer.Option("--bootstrap", metavar="HOST:PORT", help="Kafka brokers (with --topic-prefix).")
    ] = None,
    topic_prefix: Annotated[
        str,
        typer.Option(
            "--topic-prefix", envvar="FEDNESTED_TOPIC_PREFIX", help="Prefix of the topic names, with --bootstrap."
        ),
    ] = "",
    ssl_ca: Annotated[Path | None, typer.Option("--ssl-ca", help="CA certificate, to connect over TLS.")] = None,
    ssl_certificate: Annotated[
        Path | None, typer.Option("--ssl-certificate", help="An admin's (super user's) client certificate.")
    ] = None,
    ssl_key: Annotated[Path | None, typer.Option("--ssl-key", help="Private key of --ssl-certificate.")] = None,
) -> None:
    """Make the broker's ACLs for devices and the control plane exactly the federation's set. Safe to re-run.

    Connect as a super user: over TLS with an admin certificate, or over the test broker's PLAINTEXT listener.
    """
    from fednested.messaging.acls import apply_acls, federation_acls

    if (config is None) == (bootstrap is None):
        fail("give exactly one of --config PATH or --bootstrap HOST:PORT")
    settings: KafkaBusSettings
    try:
        if config is not None:
            bus = load_config(config).bus
            if not isinstance(bus, KafkaBusSettings):
                fail(f"{config}: its bus is {bus.kind!r}; ACLs exist on Kafka only")
            settings = bus
        else:
            assert bootstrap is not None
            settings = KafkaBusSettings(
                bootstrap_servers=bootstrap,
                topics=TopicsConfig(prefix=topic_prefix),
                ssl_ca=ssl_ca,
                ssl_certificate=ssl_certificate,
                ssl_key=ssl_key,
            )
    except ConfigError as error:
        fail(error.lines())
    except ValidationError as error:
        fail(describe_validation_error(error))
    try:
        report = apply_acls(settings, federation_acls(settings.topics))
    except BusError as error:
        fail(str(error))
    for line in report.lines():
        typer.echo(line)
