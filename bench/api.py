"""API benchmark: simulated devices against the control plane as deployed (gunicorn with uvicorn workers, a
connection pool, PostgreSQL), and against the single-process server `make demo` runs (daphne's runserver), on the
same database, code and load.

`make bench-api` writes bench/results/api.json. A fresh database on the PostgreSQL of var/services/env.sh holds a
`tiny` champion, an officer and an engineer, and one-time enrollment tokens; the devices (bench/api_devices.py, a
Locust process) first all enroll and fetch the champion and its manifest at once, then each calls every 0.5–1.5 s.
Loopback only, bounded by `--duration-s`. This is a benchmark, not a test: its figures depend on the machine and on
what else runs on it (the load generator shares the cores with the server).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psutil

from bench.report import machine as machine_info
from bench.report import write_report

ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "api.json"
BENCH_DATABASE = "fednested_bench_api"
SERVER_KINDS = ("deployed", "demo_server")


@dataclass(frozen=True)
class BenchSettings:
    """The load and the deployed server's shape; both configurations get the same load."""

    devices: int = 200
    duration_s: float = 60.0  # per configuration, from the first enrollment to the stop
    workers: int = 3  # gunicorn's uvicorn workers (the deployed configuration)
    pool_size: int = 4  # PostgreSQL connections each worker keeps (FEDNESTED_DB_POOL_SIZE)
    servers: tuple[str, ...] = SERVER_KINDS
    weights: tuple[int, int, int] = (6, 3, 1)  # champion poll, heartbeat, payload upload
    seed: int = 0


# --------------------------------------------------------------------------------------------------------------------
# the database, the champion, the devices' credentials


def database_url(base_url: str, name: str) -> str:
    parts = urlsplit(base_url)
    if parts.scheme not in {"postgres", "postgresql"}:
        raise SystemExit(
            f"bench-api needs PostgreSQL: DATABASE_URL is {parts.scheme or 'unset'}; source var/services/env.sh"
        )
    return urlunsplit(parts._replace(path=f"/{name}"))


def recreate_database(base_url: str, name: str, *, drop_only: bool = False) -> None:
    """Drop `name` (with whatever is connected to it) and create it empty, on the server of `base_url`."""
    import psycopg

    with psycopg.connect(base_url.replace("postgres://", "postgresql://", 1), autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if not drop_only:
            connection.execute(f'CREATE DATABASE "{name}"')


@dataclass(frozen=True)
class Fixture:
    """What the database holds for one load run: the champion's id and the devices' one-time credentials."""

    version_id: str
    champion_bytes: int
    client_ids: list[str]
    enrollment_tokens: list[str]
    csrs: list[str]


def prepare(artifacts: Path, payload_path: Path, devices: int, runs: Sequence[str]) -> dict[str, Fixture]:
    """Migrate, register and approve a `tiny` first version, and issue `devices` tokens (and CSRs) per run.

    Runs in a process of its own (`prepare_in_subprocess`), whose settings name the bench database: a process
    that already set Django up (a test run) holds connections to another database.
    """
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connections

    from apps.accounts.choices import Role
    from apps.accounts.services import create_user_with_role
    from apps.demo.bootstrap import BootstrapConfig, build_first_version, demo_corpus
    from apps.demo.run import register_first_version
    from apps.federation.services import issue_enrollment_token
    from apps.governance.actors import Actor
    from apps.governance.services import approve_version, request_approval
    from apps.registry.api.serializers import AliasSerializer
    from apps.registry.models import Alias
    from bench.aggregate import write_updates
    from fednested.deltas import expert_param_shapes
    from fednested.identity.keys import generate_private_key, make_csr
    from fednested.models import build_model

    call_command("migrate", verbosity=0)
    officer = create_user_with_role(username="olivia", role=Role.OFFICER, actor=Actor.automation("bench"))
    engineer = create_user_with_role(username="eric", role=Role.ENGINEER, actor=Actor.automation("bench"))
    config = BootstrapConfig(train_samples=8, heldout_samples=2, vocab_size=512, pretrain_steps=0)
    first = build_first_version(demo_corpus(config), config, artifacts / "versions" / "v1")
    version = register_first_version(first, engineer)
    approve_version(request_approval(version, actor=engineer), actor=officer, reason="bench")
    champion = AliasSerializer(Alias.objects.get(name="champion")).data
    champion_bytes = len(json.dumps(champion, separators=(",", ":"), default=str).encode())
    # One LoRA update of the tiny preset (rank 8, every expert): the bytes each payload upload sends.
    update = write_updates(
        payload_path.parent, expert_param_shapes(build_model("tiny", seed=0)), 1, rank=8, b_std=1e-3, seed=0
    )
    update[0].rename(payload_path)
    fixtures = {}
    for run in runs:
        client_ids = [f"bench-{run}-{index:04d}" for index in range(devices)]
        tokens = [issue_enrollment_token(actor=engineer, note=client_id)[1] for client_id in client_ids]
        csrs = [make_csr(generate_private_key(), client_id).decode("ascii") for client_id in client_ids]
        fixtures[run] = Fixture(version.version_id, champion_bytes, client_ids, tokens, csrs)
    connections.close_all()
    return fixtures


def prepare_in_subprocess(
    env: Mapping[str, str], workdir: Path, payload: Path, settings: BenchSettings
) -> dict[str, Fixture]:
    fixtures_path = workdir / "fixtures.json"
    subprocess.run(
        [
            *(sys.executable, "-m", "bench.api", "--prepare", str(fixtures_path), "--payload", str(payload)),
            *("--devices", str(settings.devices), "--servers", ",".join(settings.servers)),
        ],
        cwd=ROOT,
        env=dict(env),
        check=True,
        timeout=600,
    )
    data = json.loads(fixtures_path.read_text(encoding="utf-8"))
    return {run: Fixture(**fixture) for run, fixture in data.items()}


# --------------------------------------------------------------------------------------------------------------------
# the servers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_command(kind: str, port: int, settings: BenchSettings) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment of one server configuration."""
    if kind == "deployed":
        gunicorn = str(Path(sys.executable).with_name("gunicorn"))
        command = [gunicorn, "-c", str(ROOT / "controlplane" / "gunicorn.conf.py"), "controlplane.asgi:application"]
        return command, {
            "FEDNESTED_BIND": f"127.0.0.1:{port}",
            "WEB_CONCURRENCY": str(settings.workers),
            "FEDNESTED_DB_POOL_SIZE": str(settings.pool_size),
        }
    if kind == "demo_server":
        # As apps/demo/run.py starts it: daphne's runserver, one process, a connection per request.
        return [sys.executable, str(ROOT / "manage.py"), "runserver", "--noreload", f"127.0.0.1:{port}"], {
            "FEDNESTED_DB_POOL_SIZE": "0"
        }
    raise ValueError(f"unknown server configuration {kind!r}: use one of {SERVER_KINDS}")


def wait_for_server(url: str, process: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before answering {url}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without credentials)
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server did not answer {url} within {timeout_s:.0f} s")


def process_tree_cpu_s(root: psutil.Process) -> float:
    """User + system CPU seconds of `root` and its live descendants (the gunicorn master and its workers)."""
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


# --------------------------------------------------------------------------------------------------------------------
# figures


def latency_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Requests, errors, requests/s over the span the records cover, and latency percentiles in ms."""
    if not records:
        return {"requests": 0, "errors": 0}
    latencies = np.array([record["latency_ms"] for record in records], dtype=np.float64)
    starts = [record["start_s"] for record in records]
    ends = [record["start_s"] + record["latency_ms"] / 1000 for record in records]
    span = max(ends) - min(starts)
    return {
        "requests": len(records),
        "errors": sum(1 for record in records if record["error"]),
        "span_s": span,
        "requests_per_s": len(records) / span if span > 0 else None,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p90_ms": float(np.percentile(latencies, 90)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "max_ms": float(latencies.max()),
    }


def summarize(records: Sequence[Mapping[str, Any]], cpu_s: float) -> dict[str, Any]:
    """The headline keys over every request, plus per phase and per call; the first error messages as examples."""
    overall = latency_summary(records)
    by_phase = {
        phase: latency_summary([record for record in records if record["phase"] == phase])
        for phase in ("approval", "steady")
    }
    names = sorted({record["name"] for record in records})
    by_call = {name: latency_summary([record for record in records if record["name"] == name]) for name in names}
    statuses: dict[str, int] = {}
    for record in records:
        statuses[str(record["status"])] = statuses.get(str(record["status"]), 0) + 1
    return {
        "p99_ms": overall.get("p99_ms"),
        "errors": overall["errors"],
        "requests_per_s": overall.get("requests_per_s"),
        "cpu_ms_per_request": 1000 * cpu_s / overall["requests"] if overall["requests"] else None,
        "server_cpu_s": cpu_s,
        "overall": overall,
        "phases": by_phase,
        "calls": by_call,
        "statuses": statuses,
        "error_examples": sorted({record["error"] for record in records if record["error"]})[:5],
    }


# --------------------------------------------------------------------------------------------------------------------
# one configuration


def run_configuration(
    kind: str, fixture: Fixture, settings: BenchSettings, env: Mapping[str, str], workdir: Path, payload: Path
) -> dict[str, Any]:
    """Start the server `kind`, run the devices against it, stop it; the summary of what the devices saw."""
    port = free_port()
    command, extra = server_command(kind, port, settings)
    server_env = {**env, **extra, "FEDNESTED_ACCESS_LOG": str(workdir / f"{kind}-access.log")}
    log = (workdir / f"{kind}-server.log").open("wb")
    server = subprocess.Popen(command, cwd=ROOT, env=server_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        host = f"http://127.0.0.1:{port}"
        wait_for_server(f"{host}/api/v1/aliases/champion/", server)
        time.sleep(2.0)  # let every worker finish importing: its start-up CPU is not the load's
        spec = {
            "host": host,
            "duration_s": settings.duration_s,
            "client_ids": fixture.client_ids,
            "enrollment_tokens": fixture.enrollment_tokens,
            "csrs": fixture.csrs,
            "payload_path": str(payload),
            "weights": list(settings.weights),
            "seed": settings.seed,
        }
        spec_path, records_path = workdir / f"{kind}-spec.json", workdir / f"{kind}-records.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        tree = psutil.Process(server.pid)
        cpu_before = process_tree_cpu_s(tree)
        subprocess.run(
            [sys.executable, "-m", "bench.api_devices", str(spec_path), str(records_path)],
            cwd=ROOT,
            env={**env, "PYTHONPATH": str(ROOT)},
            check=True,
            timeout=settings.duration_s + 120,
        )
        cpu_s = process_tree_cpu_s(tree) - cpu_before
        records = json.loads(records_path.read_text(encoding="utf-8"))
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    summary = summarize(records, cpu_s)
    summary["server"] = {"kind": kind, "command": " ".join(command[1:] if kind == "deployed" else command[2:])}
    summary["server"].update({key: value for key, value in extra.items() if key != "FEDNESTED_BIND"})
    return summary


def bench_environment(database: str, artifacts: Path, bus_path: Path) -> dict[str, str]:
    """The servers' (and the fixture's) environment: the bench database, a private store and an embedded bus (the
    calls measured publish nothing), no Celery broker (nothing is enqueued), DEBUG off."""
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": database,
            "DJANGO_SETTINGS_MODULE": "controlplane.settings",
            "FEDNESTED_ARTIFACT_ROOT": str(artifacts),
            "FEDNESTED_BUS": "embedded",
            "FEDNESTED_BUS_PATH": str(bus_path),
            "DEBUG": "false",
            "LOG_LEVEL": "WARNING",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
        }
    )
    for name in ("CELERY_BROKER_URL", "FEDNESTED_DEVICES_REQUIRE_CERTIFICATE", "FEDNESTED_PROXY_SECRET"):
        env.pop(name, None)
    return env


def run(settings: BenchSettings, out: Path, *, database_name: str = BENCH_DATABASE) -> dict[str, Any]:
    started = time.perf_counter()
    base_url = os.environ.get("DATABASE_URL", "")
    database = database_url(base_url, database_name)
    recreate_database(base_url, database_name)
    try:
        with tempfile.TemporaryDirectory(prefix="fednested-bench-api-") as scratch:
            workdir = Path(scratch)
            artifacts, payload = workdir / "artifacts", workdir / "payload" / "adapters.safetensors"
            payload.parent.mkdir(parents=True)
            env = bench_environment(database, artifacts, workdir / "bus.sqlite3")
            fixtures = prepare_in_subprocess(env, workdir, payload, settings)
            report: dict[str, Any] = {
                "schema": "fednested.bench.api/1",
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": machine_info(1),
                "settings": asdict(settings),
                "champion_answer_bytes": next(iter(fixtures.values())).champion_bytes,
                "payload_bytes": payload.stat().st_size,
            }
            configurations = {
                kind: run_configuration(kind, fixtures[kind], settings, env, workdir, payload)
                for kind in settings.servers
            }
    finally:
        recreate_database(base_url, database_name, drop_only=True)
    report["configurations"] = configurations
    headline = configurations.get("deployed") or next(iter(configurations.values()))
    report.update({key: headline[key] for key in ("p99_ms", "errors", "requests_per_s", "cpu_ms_per_request")})
    if "deployed" in configurations and "demo_server" in configurations:
        ours, demo = configurations["deployed"], configurations["demo_server"]
        report["versus_demo_server"] = {
            "p99_ratio": demo["p99_ms"] / ours["p99_ms"] if ours["p99_ms"] else None,
            "requests_per_s_ratio": ours["requests_per_s"] / demo["requests_per_s"] if demo["requests_per_s"] else None,
            "cpu_ms_per_request_ratio": demo["cpu_ms_per_request"] / ours["cpu_ms_per_request"]
            if ours["cpu_ms_per_request"]
            else None,
        }
    return write_report(report, out, started=started)


def main(argv: Sequence[str] | None = None) -> int:
    defaults = BenchSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=defaults.devices)
    parser.add_argument("--duration-s", type=float, default=defaults.duration_s)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--pool-size", type=int, default=defaults.pool_size)
    parser.add_argument("--servers", default=",".join(defaults.servers), help=f"comma-separated: {SERVER_KINDS}")
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    # Internal: the fixture step, run by prepare_in_subprocess with the bench database's settings.
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--payload", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    servers = tuple(name.strip() for name in args.servers.split(",") if name.strip())
    if args.prepare is not None:
        fixtures = prepare(Path(os.environ["FEDNESTED_ARTIFACT_ROOT"]), args.payload, args.devices, servers)
        args.prepare.write_text(json.dumps({run: asdict(f) for run, f in fixtures.items()}), encoding="utf-8")
        return 0
    unknown = [name for name in servers if name not in SERVER_KINDS]
    if unknown or not servers:
        parser.error(f"--servers {args.servers!r}: use names from {SERVER_KINDS}")
    if not 1 <= args.devices <= 1000 or not 1 <= args.duration_s <= 600:
        parser.error("--devices must be 1..1000 and --duration-s 1..600 (the bench is bounded)")
    settings = BenchSettings(
        devices=args.devices,
        duration_s=args.duration_s,
        workers=args.workers,
        pool_size=args.pool_size,
        servers=servers,
    )
    report = run(settings, args.out)
    for kind, figures in report["configurations"].items():
        print(
            f"{kind:12s} p99 {figures['p99_ms']:.0f} ms, {figures['requests_per_s']:.0f} requests/s, "
            f"{figures['errors']} errors, {figures['cpu_ms_per_request']:.2f} ms CPU/request "
            f"(approval p99 {figures['phases']['approval'].get('p99_ms', float('nan')):.0f} ms)"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
