"""The simulated devices of `make bench-api` (bench/api.py): a Locust load run in a process of its own, because
Locust patches the standard library for gevent when imported and the orchestrator talks to PostgreSQL through Django.

`python -m bench.api_devices <spec.json> <records.json>`: every device in the spec starts at once, enrolls with its
one-time token and CSR and fetches the champion and its manifest (what an approval triggers); then each calls every
0.5–1.5 s: champion polls (with the ETag it holds), heartbeats, and payload uploads of the `tiny` preset. Every
request is written to <records.json> with its phase, so the orchestrator computes the figures.
"""

from __future__ import annotations

import hashlib
import json
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, between, events, task
from locust.env import Environment

API = "/api/v1/"
APPROVAL, STEADY = "approval", "steady"


@dataclass(frozen=True)
class LoadSpec:
    """What the orchestrator hands the load process: where the server is, the devices, how long, the payload."""

    host: str
    duration_s: float
    client_ids: list[str]
    enrollment_tokens: list[str]
    csrs: list[str]
    payload_path: str
    # Relative weights of the steady calls: champion poll, heartbeat, payload upload.
    weights: tuple[int, int, int] = (6, 3, 1)
    seed: int = 0

    @classmethod
    def read(cls, path: Path) -> LoadSpec:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(**{**data, "weights": tuple(data["weights"])})


@dataclass(frozen=True)
class RequestRecord:
    phase: str
    name: str
    start_s: float  # wall clock (time.time) when the request started
    latency_ms: float
    status: int
    error: str


def run_load(spec: LoadSpec) -> list[RequestRecord]:
    """Start every device at once and stop them all after `duration_s`; each request as Locust timed it."""
    payload = Path(spec.payload_path).read_bytes()
    payload_sha256 = hashlib.sha256(payload).hexdigest()
    unassigned = list(zip(spec.client_ids, spec.enrollment_tokens, spec.csrs, strict=True))
    records: list[RequestRecord] = []

    def on_request(
        name: str,
        response_time: float,
        response: Any,
        context: dict[str, Any],
        exception: BaseException | None,
        start_time: float,
        **_: Any,
    ) -> None:
        status = int(getattr(response, "status_code", 0) or 0)
        records.append(
            RequestRecord(
                phase=str(context.get("phase", STEADY)),
                name=name,
                start_s=start_time,
                latency_ms=float(response_time),
                status=status,
                error="" if exception is None else f"{type(exception).__name__}: {exception}"[:300],
            )
        )

    poll_weight, heartbeat_weight, upload_weight = spec.weights

    class Device(FastHttpUser):
        host = spec.host
        wait_time = between(0.5, 1.5)
        # One connection per device, as a device keeps its HTTP session; no limit below the device count.
        concurrency = 1
        network_timeout = 60.0
        connection_timeout = 60.0

        client_id = ""
        api_token = ""
        version_id = ""
        etag = ""

        def headers(self) -> dict[str, str]:
            return {"Authorization": f"Token {self.api_token}", "Accept": "application/json"}

        def on_start(self) -> None:
            self.client_id, token, csr = unassigned.pop()
            phase = {"phase": APPROVAL}
            with self.client.post(
                f"{API}enroll/",
                json={"token": token, "client_id": self.client_id, "csr": csr},
                name="enroll",
                context=phase,
                catch_response=True,
            ) as enrolled:
                if enrolled.status_code != 201:
                    enrolled.failure(f"enroll answered {enrolled.status_code}: {enrolled.text[:200]}")
                    self.stop()
                    return
                self.api_token = enrolled.json()["api_token"]
            self.poll(phase)
            if not self.version_id:
                return  # the poll failed (counted): the device asks again on its next poll, as a real one would
            self.client.get(
                f"{API}versions/{self.version_id}/files/manifest.json/",
                headers={**self.headers(), "Accept": "application/octet-stream"},
                name="manifest",
                context=phase,
            )

        def poll(self, context: dict[str, Any]) -> None:
            headers = self.headers()
            if self.etag:
                headers["If-None-Match"] = self.etag
            with self.client.get(
                f"{API}aliases/champion/", headers=headers, name="champion", context=context, catch_response=True
            ) as answer:
                if answer.status_code == 200:
                    self.version_id = answer.json()["version"]["version_id"]
                    self.etag = answer.headers.get("ETag") or ""
                elif answer.status_code != 304:
                    answer.failure(f"champion answered {answer.status_code}")

        @task(poll_weight)
        def champion(self) -> None:
            self.poll({"phase": STEADY})

        @task(heartbeat_weight)
        def heartbeat(self) -> None:
            if not self.version_id:
                self.poll({"phase": STEADY})  # no champion yet: a device reports a version only once it has one
                return
            self.client.post(
                f"{API}devices/{self.client_id}/heartbeat/",
                json={"current_version": self.version_id},
                headers=self.headers(),
                name="heartbeat",
                context={"phase": STEADY},
            )

        @task(upload_weight)
        def upload(self) -> None:
            self.client.put(
                f"{API}updates/{uuid.uuid4()}/payload/",
                data=payload,
                headers={
                    **self.headers(),
                    "Content-Type": "application/octet-stream",
                    "X-Content-SHA256": payload_sha256,
                },
                name="payload",
                context={"phase": STEADY},
            )

    environment = Environment(user_classes=[Device], events=events)
    environment.events.request.add_listener(on_request)
    runner = environment.create_local_runner()
    devices = len(spec.client_ids)
    runner.start(devices, spawn_rate=devices)
    gevent.spawn_later(spec.duration_s, runner.quit)
    runner.greenlet.join()
    return records


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.api_devices <spec.json> <records.json>", file=sys.stderr)
        return 2
    records = run_load(LoadSpec.read(Path(argv[0])))
    Path(argv[1]).write_text(json.dumps([record.__dict__ for record in records]), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
