"""`fednested tier1 ...`: data-centre (Tier-1) jobs run from the command line, without the web server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from fednested.cli.errors import fail
from fednested.config import ConfigError, load_config
from fednested.config.models import Tier1Config

tier1_app = typer.Typer(
    help="Tier-1 (data centre) jobs: core updates under DeepSpeed, expert aggregation.", no_args_is_help=True
)
# The checkout this package runs from: the control plane's workers (workers/ingest) live beside fednested/.
_CHECKOUT = Path(__file__).resolve().parents[2]


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


def control_plane_env(config: Tier1Config, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of a control-plane process that uses the tier1 config's bus and artifact store, with jobs run
    in that process (no Celery broker); ValueError when something the control plane needs is missing."""
    if not environ.get("DATABASE_URL"):
        raise ValueError(
            "DATABASE_URL is not set: the update consumer records updates, windows and candidates in the control "
            "plane's database (postgres://user:password@host:port/name)"
        )
    if not (_CHECKOUT / "workers" / "ingest").is_dir():
        raise ValueError(f"the control plane's workers are not beside this fednested package ({_CHECKOUT})")
    bus = config.bus
    env = dict(environ)
    env.update(
        DJANGO_SETTINGS_MODULE=env.get("DJANGO_SETTINGS_MODULE", "controlplane.settings"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(_CHECKOUT), environ.get("PYTHONPATH")])),
        FEDNESTED_ARTIFACT_ROOT=str(Path(config.storage.artifact_root).resolve()),
        FEDNESTED_BUS=bus.kind,
        FEDNESTED_TOPIC_PREFIX=bus.topics.prefix,
        # No broker: a window's aggregation (and its candidate's evaluation) runs in a thread of this process.
        CELERY_BROKER_URL="",
    )
    if bus.kind == "embedded":
        env["FEDNESTED_BUS_PATH"] = str(Path(bus.path).resolve())
        return env
    if bus.librdkafka:
        raise ValueError(
            f"bus.librdkafka ({', '.join(sorted(bus.librdkafka))}) cannot be passed to the control plane, whose Kafka "
            "settings are bootstrap_servers, ssl_ca, ssl_certificate and ssl_key: drop them"
        )
    env["FEDNESTED_KAFKA_BOOTSTRAP"] = bus.bootstrap_servers
    for name, value in (
        ("FEDNESTED_KAFKA_SSL_CA", bus.ssl_ca),
        ("FEDNESTED_KAFKA_SSL_CERTIFICATE", bus.ssl_certificate),
        ("FEDNESTED_KAFKA_SSL_KEY", bus.ssl_key),
    ):
        env[name] = str(Path(value).resolve()) if value is not None else ""
    return env


@tier1_app.command("aggregate-experts")
def aggregate_experts_command(
    config: Annotated[Path, typer.Option("--config", help="tier1 config: bus and storage.artifact_root.")],
    max_seconds: Annotated[
        float | None,
        typer.Option("--max-seconds", min=0.0, help="Stop (as on SIGTERM) after this many seconds."),
    ] = None,
    max_messages: Annotated[
        int | None, typer.Option("--max-messages", min=1, help="Stop after this many update envelopes.")
    ] = None,
    idle_exit: Annotated[
        float | None, typer.Option("--idle-exit", min=0.0, help="Stop when no envelope came for this many seconds.")
    ] = None,
    group: Annotated[str | None, typer.Option("--group", help="Consumer group (default: the ingest worker's).")] = None,
    poll_timeout: Annotated[float, typer.Option("--poll-timeout", min=0.01, help="Seconds per bus poll.")] = 1.0,
    metrics_port: Annotated[
        int, typer.Option("--metrics-port", min=0, max=65535, help="Serve Prometheus metrics here; 0: none.")
    ] = 0,
) -> None:
    """Consume edge update envelopes and aggregate each window that becomes ready, without the web server.

    Runs the control plane's update consumer (`python -m workers.ingest`) on the tier1 config's bus and artifact
    store and the database of DATABASE_URL, with jobs in its own process: a full window (or one past its deadline)
    is aggregated into a candidate, which is evaluated, exactly as with the web server and Celery workers. On SIGTERM,
    SIGINT or --max-seconds it finishes the batch and the jobs in hand, then exits with the consumer's status.
    """
    try:
        settings = load_config(config, "tier1")
    except ConfigError as error:
        fail(error.lines())
    try:
        env = control_plane_env(settings, os.environ)
    except ValueError as error:
        fail(str(error))
    argv = [sys.executable, "-m", "workers.ingest", "--poll-timeout", str(poll_timeout)]
    argv += ["--metrics-port", str(metrics_port)]
    if max_messages is not None:
        argv += ["--max-messages", str(max_messages)]
    if idle_exit is not None:
        argv += ["--idle-exit", str(idle_exit)]
    if group is not None:
        argv += ["--group", group]
    consumer = subprocess.Popen(argv, env=env, cwd=_CHECKOUT)
    stopped = False

    def forward(signum: int, frame: FrameType | None) -> None:
        # The consumer stops cleanly on SIGTERM: it commits its batch and waits for the jobs it started.
        nonlocal stopped
        stopped = True
        consumer.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        consumer.wait(timeout=max_seconds)
    except subprocess.TimeoutExpired:
        typer.echo(f"--max-seconds {max_seconds:g} reached: stopping the consumer", err=True)
        consumer.send_signal(signal.SIGTERM)
        stopped = True
    status = consumer.wait()
    if stopped and status == -signal.SIGTERM:
        # Killed by our SIGTERM: it came before the consumer set up its handler, i.e. before it consumed anything.
        typer.echo("the consumer was stopped while starting, before it consumed anything", err=True)
        status = 0
    raise typer.Exit(code=status)
