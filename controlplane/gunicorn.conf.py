"""The control plane's production HTTP server: gunicorn managing uvicorn worker processes that serve the ASGI
application (controlplane.asgi: the REST API, the console, websockets, and the request limits that answer before a
body is read). `gunicorn -c controlplane/gunicorn.conf.py controlplane.asgi:application` (docs/operations/serving.md).

Read by gunicorn itself, so it is configured by the environment like the settings module: FEDNESTED_BIND and
WEB_CONCURRENCY (gunicorn's own name for the worker count).
"""

import os
import shutil
import tempfile
from typing import Any

bind = [os.environ.get("FEDNESTED_BIND", "127.0.0.1:8000")]
# Django's views are synchronous: a worker runs one at a time in CPU, so more workers than cores only add memory.
# One per core plus one keeps a core busy while another worker waits on PostgreSQL.
workers = int(os.environ.get("WEB_CONCURRENCY", str((os.cpu_count() or 1) + 1)))
worker_class = "uvicorn_worker.UvicornWorker"
# A request that takes longer than this is a stuck worker: gunicorn replaces it (uploads are bounded at 64 MiB).
timeout = 120
graceful_timeout = 30
keepalive = 5
# One line per request, as daphne's runserver writes it (settings.LOGGING): the uvicorn workers log each request
# (client, method, path, status) through gunicorn's access log; errors and worker restarts to the error log.
accesslog = os.environ.get("FEDNESTED_ACCESS_LOG", "-")
errorlog = "-"

# Several worker processes answer on one port, so /metrics must sum over all of them: prometheus_client's
# multiprocess mode, with a fresh directory per server start unless the operator names one (then it must be emptied
# before each start: docs/operations/production.md). Set here, in the master, before the workers are forked and import
# prometheus_client; a worker that exits has its live gauges dropped (`child_exit`).
_own_metrics_directory = None
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _own_metrics_directory = tempfile.mkdtemp(prefix="fednested-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _own_metrics_directory


def child_exit(server: object, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_exit(server: object) -> None:
    if _own_metrics_directory is not None:
        shutil.rmtree(_own_metrics_directory, ignore_errors=True)
