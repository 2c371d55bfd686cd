"""A real Prometheus server (Debian's binary, on 127.0.0.1, a temporary data directory, a 1 s scrape interval, our
rules loaded) scrapes a live control plane and an ingest worker on Kafka; its HTTP API must then hold the series the
processes export, with the values of what happened: one update buffered, one refused for its signature, no lag
left. Also the lag gauge on its own: a group that committed one of three messages is two behind."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from apps.demo.processes import free_port
from controlplane.metrics.lag import ConsumerLagCollector
from fednested.identity.keys import generate_private_key
from fednested.messaging import KafkaBusSettings, Topic, TopicsConfig, bootstrap_topics, make_bus
from tests.federation_world import Device, WorkerWorld, enroll
from tests.workers.test_ingest_crash_recovery import kafka_servers, shared_database_url

pytestmark = [pytest.mark.kafka, pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(240)]
REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "fednested-rules.yml"


def kafka_bus(name: str) -> KafkaBusSettings:
    settings = KafkaBusSettings(
        bootstrap_servers=kafka_servers(), topics=TopicsConfig(prefix=f"{name}-{uuid.uuid4().hex[:8]}.")
    )
    bootstrap_topics(settings)
    return settings


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing answers on port {port}:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is missing: install Debian's `prometheus` package (scripts/services.sh packages)")
    return binary


class Prometheus:
    """A Prometheus server of this test; `query` runs an instant query through its HTTP API."""

    def __init__(self, port: int) -> None:
        self.port = port

    def query(self, expression: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def values(self, expression: str) -> dict[str, float]:
        """Series → value, each series written as its sorted labels (without __name__)."""
        return {
            ",".join(f"{k}={v}" for k, v in sorted(row["metric"].items()) if k != "__name__"): float(row["value"][1])
            for row in self.query(expression)
        }


@pytest.fixture
def start_prometheus(prometheus_binary: str, tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Prometheus]]:
    processes: list[subprocess.Popen[bytes]] = []

    def start(targets: dict[str, str]) -> Prometheus:
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in targets.items()
            ],
        }
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        port = free_port(0)
        log = tmp_path / "prometheus.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [
                    prometheus_binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        processes.append(process)
        wait_for_port(port, process, log, 60)
        return Prometheus(port)

    yield start
    for process in processes:
        stop(process)


@pytest.mark.django_db(transaction=True)
def test_prometheus_scrapes_the_control_plane_and_the_ingest_worker(
    world: WorkerWorld,
    make_update: Callable[..., Any],
    live_server: Any,
    start_prometheus: Callable[[dict[str, str]], Prometheus],
    tmp_path: Path,
) -> None:
    bus = kafka_bus("metrics-scrape")
    round_ = world.open_round(k=5)
    device = enroll(world, "car-scraped")
    good, _ = make_update(device, round_id=round_.round_id)
    # Signed with a key the control plane never saw: refused as bad_signature, no row.
    impostor = Device(row=device.row, api_token=device.api_token, signing_key=generate_private_key())
    forged, _ = make_update(impostor, seed=1, round_id=round_.round_id)
    with make_bus(bus) as producer:
        producer.publish(Topic.UPDATES, good)
        producer.publish(Topic.UPDATES, forged)
    metrics_port = free_port(0)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DATABASE_URL": shared_database_url(),
        "FEDNESTED_BUS": "kafka",
        "FEDNESTED_KAFKA_BOOTSTRAP": bus.bootstrap_servers,
        "FEDNESTED_TOPIC_PREFIX": bus.topics.prefix,
        "FEDNESTED_ARTIFACT_ROOT": str(world.root),
        "CELERY_BROKER_URL": "",
    }
    log = tmp_path / "ingest.log"
    with log.open("wb") as output:
        worker = subprocess.Popen(
            [sys.executable, "-m", "workers.ingest", "--group", "metrics-scrape", "--metrics-port", str(metrics_port)],
            cwd=REPO,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(metrics_port, worker, log, 120)
        # One request the control plane answers 401 (no credentials), to be counted by its route name.
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"{live_server.url}/api/v1/tasks/", timeout=10)
        prometheus = start_prometheus(
            {
                "fednested-controlplane": urllib.parse.urlsplit(live_server.url).netloc,
                "fednested-ingest": f"127.0.0.1:{metrics_port}",
            }
        )
        ingest = f'job="fednested-ingest",instance="127.0.0.1:{metrics_port}"'
        # Expression → the values of its series, sorted; None: at least one series, any value.
        expected: dict[str, list[float] | None] = {
            f"up{{{ingest}}}": [1.0],
            'up{job="fednested-controlplane"}': [1.0],
            f'fednested_updates_total{{{ingest},source="bus",outcome="buffered",reason="none"}}': [1.0],
            f'fednested_updates_total{{{ingest},source="bus",outcome="refused",reason="bad_signature"}}': [1.0],
            # The ingest worker's own counts (the live server shares this test process's registry with the tests
            # before it, so its counts are not this test's alone).
            f'sum(fednested_updates_total{{{ingest},outcome="rejected"}}) or vector(0)': [0.0],
            f'fednested_ingest_consumer_lag_up{{{ingest},group="metrics-scrape"}}': [1.0],
            "sum(fednested_ingest_consumer_lag)": [0.0],
            f'fednested_window_buffered_updates{{round_id="{round_.round_id}",status="open"}}': [1.0],
            f'fednested_window_buffer_size{{round_id="{round_.round_id}"}}': [5.0],
            'fednested_http_requests_total{job="fednested-controlplane",view="task-list",status="401"} >= 1': None,
            'fednested_database_metrics_up{job="fednested-controlplane"}': [1.0],
            # Our recording rules, evaluated by this server on the scraped series.
            "fednested:updates:rate5m": None,
        }
        deadline = time.monotonic() + 90
        while True:
            seen = {expression: sorted(prometheus.values(expression).values()) for expression in expected}
            if all(seen[key] == want if want is not None else seen[key] for key, want in expected.items()):
                break
            assert worker.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, f"Prometheus never saw the expected series: {seen}"
            time.sleep(1)
    finally:
        stop(worker)


def test_consumer_lag_counts_what_the_group_has_not_committed(
    world: WorkerWorld, make_update: Callable[..., Any]
) -> None:
    bus = kafka_bus("metrics-lag")
    device = enroll(world, "car-lagging")
    with make_bus(bus) as producer:
        for seed in range(3):
            # One device's envelopes share a key, hence a partition.
            producer.publish(Topic.UPDATES, make_update(device, seed=seed)[0])
        with producer.consumer("metrics-lag", [Topic.UPDATES]) as consumer:
            collector = ConsumerLagCollector(bus, "metrics-lag")
            try:
                # Nothing committed yet: the group would start at the earliest offset, three behind.
                assert lag_of(collector) == (1.0, 3.0)
                deadline = time.monotonic() + 60
                message = None
                while message is None:
                    assert time.monotonic() < deadline, "no message within 60 s"
                    message = consumer.poll(1.0)
                consumer.commit(message)
                assert lag_of(collector) == (1.0, 2.0)
            finally:
                collector.close()


def lag_of(collector: ConsumerLagCollector) -> tuple[float, float]:
    """(the `up` gauge, the lag summed over partitions) of one collection."""
    families = {family.name: family for family in collector.collect()}
    up = [sample.value for sample in families["fednested_ingest_consumer_lag_up"].samples]
    lag = sum(sample.value for sample in families["fednested_ingest_consumer_lag"].samples)
    return up[0], lag
