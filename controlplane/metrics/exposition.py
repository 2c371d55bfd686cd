"""What a scrape of one process returns, and the metrics port of the worker processes (the web server answers on
its own `/metrics` route instead, controlplane/metrics/web.py).

One process, one port: the web server (daphne), the ingest worker and a Celery worker with the solo or threads pool
each expose their own metrics, and Prometheus scrapes each. A Celery worker with the prefork pool runs tasks in
child processes: set PROMETHEUS_MULTIPROC_DIR (prometheus_client's own variable, an empty directory per worker,
emptied before it starts) and the worker's port serves the sum over its children, read from the files they write.
"""

import logging
import os
from collections.abc import Iterable, Iterator
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_directory() -> str | None:
    """The directory of prometheus_client's multiprocess mode, when this process runs in it."""
    return os.environ.get(MULTIPROCESS_ENV) or None


class Scrape:
    """This process's metrics (or, in multiprocess mode, those of every process writing to the directory) followed
    by the gauges computed at scrape time by `extra` collectors."""

    def __init__(self, extra: Iterable[Collector] = ()) -> None:
        directory = multiprocess_directory()
        if directory is None:
            self.base: Collector = REGISTRY
        else:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
            self.base = registry
        self.extra = tuple(extra)

    def collect(self) -> Iterator[Metric]:
        yield from self.base.collect()
        for collector in self.extra:
            yield from collector.collect()


def serve_metrics(port: int, address: str, *, process: str, extra: Iterable[Collector] = ()) -> WSGIServer:
    """Serve `Scrape(extra)` on http://address:port/metrics from a daemon thread; returns the server (for tests and
    shutdown). Raises OSError naming the setting when the port is taken."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Scrape(extra))
    try:
        server, thread = start_http_server(port, addr=address, registry=registry)
    except OSError as error:
        raise OSError(
            f"{process}: cannot serve metrics on {address}:{port} ({error}); pick another port "
            "(the worker's --metrics-port or its FEDNESTED_*_METRICS_PORT setting), or 0 for none"
        ) from error
    _threads.append(thread)
    logger.info("%s: metrics on http://%s:%d/metrics", process, address, server.server_port)
    return server


# Kept referenced for the life of the process (the threads are daemons: they end with it).
_threads: list[Thread] = []
