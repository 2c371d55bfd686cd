"""The server's log has one line per request (method, path, status, duration), whatever the status: the real server
(`manage.py runserver`, daphne's, as the demo runs it) in a subprocess, its log read back."""

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings

from apps.demo.processes import free_port

pytestmark = pytest.mark.timeout(180)

# daphne's access line: `HTTP GET /api/v1/tasks/ 401 [0.01, 127.0.0.1:39852]` (duration in seconds, then the client).
ACCESS_LINE = re.compile(r"^HTTP (?P<method>[A-Z]+) (?P<path>\S+) (?P<status>\d{3}) \[\d+\.\d+, 127\.0\.0\.1:\d+\]$")
REQUESTS = {"/admin/login/": 200, "/api/v1/tasks/": 401, "/api/v1/no-such-thing/": 404}


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code


def test_each_request_is_logged_once(tmp_path: Path) -> None:
    port = free_port(0)
    log_path = tmp_path / "server.log"
    env = {
        **os.environ,
        # No database server: these requests read none, and the server must not touch the test database.
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
            cwd=settings.BASE_DIR,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while "Listening on TCP address" not in log_path.read_text(errors="replace"):
            assert server.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "runserver did not start within 120 s"
            time.sleep(0.2)
        answered = {path: status_of(f"http://127.0.0.1:{port}{path}") for path in REQUESTS}
        assert answered == REQUESTS
        # The access line is written once the response is sent; give it a moment to reach the file.
        deadline = time.monotonic() + 10
        while log_path.read_text(errors="replace").count("HTTP GET ") < len(REQUESTS) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        server.terminate()
        server.wait(timeout=30)
    lines = log_path.read_text(errors="replace").splitlines()
    for path, status in REQUESTS.items():
        mentions = [line for line in lines if path in line]
        assert len(mentions) == 1, f"{path} is logged {len(mentions)} times:\n" + "\n".join(mentions)
        match = ACCESS_LINE.match(mentions[0])
        assert match is not None, mentions[0]
        assert (match["method"], match["path"], int(match["status"])) == ("GET", path, status)
