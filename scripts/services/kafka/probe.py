"""Waits until the test Kafka broker answers metadata requests as the cluster it was formatted as.

Run by scripts/services/kafka.sh with the cached virtualenv's Python, so readiness is judged by the client the
code under test uses (confluent-kafka), not by a port probe.
"""

import argparse
import logging
import os
import sys
import time

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient


def broker_process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for_broker(bootstrap: str, cluster_id: str, pid: int, timeout_s: float) -> str:
    """Returns a one-line description of the answering broker; raises RuntimeError saying why it did not answer."""
    # librdkafka reports every refused connection while the broker starts; those are expected here, so they go
    # to a logger that drops them instead of cluttering the start-up output.
    quiet = logging.getLogger("fednested.services.kafka_probe")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    admin = AdminClient({"bootstrap.servers": bootstrap}, logger=quiet)
    deadline = time.monotonic() + timeout_s
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if not broker_process_alive(pid):
            raise RuntimeError(f"the broker process (pid {pid}) exited before answering on {bootstrap}")
        try:
            metadata = admin.list_topics(timeout=2)
        except KafkaException as error:
            last_error = str(error)
            time.sleep(0.2)
            continue
        if metadata.cluster_id != cluster_id:
            raise RuntimeError(
                f"{bootstrap} answers as cluster {metadata.cluster_id!r}, not {cluster_id!r}: "
                "another broker holds that port"
            )
        brokers = {f"{broker.host}:{broker.port}" for broker in metadata.brokers.values()}
        if bootstrap in brokers:
            return f"cluster {cluster_id}, brokers {sorted(brokers)}, controller {metadata.controller_id}"
        last_error = f"metadata lists brokers {sorted(brokers)}, not {bootstrap}"
        time.sleep(0.2)
    raise RuntimeError(f"the broker did not answer on {bootstrap} within {timeout_s:.0f}s ({last_error})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True, help="host:port of the PLAINTEXT listener")
    parser.add_argument("--cluster-id", required=True, help="the id the storage was formatted with")
    parser.add_argument("--pid", type=int, required=True, help="the broker's process id")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait")
    args = parser.parse_args()
    try:
        print(wait_for_broker(args.bootstrap, args.cluster_id, args.pid, args.timeout))
    except RuntimeError as error:
        print(f"kafka probe: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
