"""Embedded (SQLite) bus specifics beyond the shared contract: assignment, session expiry, concurrent writers,
retention, and errors for unusable files and missing topics."""

import os
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fednested.messaging import BusError, EmbeddedBusSettings, Telemetry, Topic, TopicsConfig, make_bus
from fednested.messaging.embedded import EmbeddedBus, assign_partitions, connect, purge_expired

REPO_ROOT = Path(__file__).resolve().parents[3]
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def telemetry(client_id: str, steps: int) -> Telemetry:
    return Telemetry(
        client_id=client_id, loss=1.0, steps=steps, duration_s=1.0, outcome="succeeded", started_at=NOW, finished_at=NOW
    )


def test_assignment_is_disjoint_complete_balanced_and_respects_subscriptions() -> None:
    members = [("b", frozenset({"t1", "t2"})), ("a", frozenset({"t1", "t2"})), ("c", frozenset({"t2"}))]
    assignment = assign_partitions(members, {"t1": 4, "t2": 3})
    owned = [tp for tps in assignment.values() for tp in tps]
    assert sorted(owned) == [("t1", p) for p in range(4)] + [("t2", p) for p in range(3)]
    assert {topic for topic, _ in assignment["c"]} == {"t2"}
    assert sorted(len(tps) for tps in assignment.values()) == [2, 2, 3]
    assert assign_partitions(list(reversed(members)), {"t1": 4, "t2": 3}) == assignment


def test_member_that_stops_polling_loses_its_partitions_and_rejoins_at_the_committed_offset(tmp_path: Path) -> None:
    settings = EmbeddedBusSettings(path=tmp_path / "bus.sqlite3", session_timeout_s=1.0, poll_interval_s=0.01)
    with make_bus(settings) as bus:
        stalled, steady = bus.consumer("g", [Topic.TELEMETRY]), bus.consumer("g", [Topic.TELEMETRY])
        deadline = time.monotonic() + 10
        while not (stalled.assignment() and steady.assignment()) and time.monotonic() < deadline:
            stalled.poll(0.05)
            steady.poll(0.05)
        assert len(stalled.assignment()) + len(steady.assignment()) == 3
        for steps in range(6):
            bus.publish(Topic.TELEMETRY, telemetry(f"edge-{steps}", steps))
        time.sleep(1.3)  # `stalled` neither polls nor heartbeats for longer than the session timeout
        received = []
        deadline = time.monotonic() + 10
        while len(received) < 6 and time.monotonic() < deadline:
            message = steady.poll(0.05)
            if message is not None:
                received.append(message)
                steady.commit(message)
        assert len(steady.assignment()) == 3
        assert sorted(m.event.steps for m in received if isinstance(m.event, Telemetry)) == list(range(6))
        # Back again: it rejoins, gets its share once `steady` lets go, and starts at the group's offsets, so it
        # sees nothing old.
        deadline = time.monotonic() + 10
        while not stalled.assignment() and time.monotonic() < deadline:
            assert stalled.poll(0.05) is None
            assert steady.poll(0.05) is None
        assert len(stalled.assignment()) + len(steady.assignment()) == 3
        assert stalled.poll(0.3) is None
        stalled.close()
        steady.close()


def test_concurrent_writers_in_threads_and_processes_get_gapless_offsets(tmp_path: Path) -> None:
    path = tmp_path / "bus.sqlite3"
    settings = EmbeddedBusSettings(path=path)
    script = (
        "import sys; from pathlib import Path; from datetime import UTC, datetime\n"
        "from fednested.messaging import EmbeddedBusSettings, Telemetry, Topic, make_bus\n"
        "now = datetime.now(UTC)\n"
        "with make_bus(EmbeddedBusSettings(path=Path(sys.argv[1]))) as bus:\n"
        "    for i in range(40):\n"
        "        bus.publish(Topic.TELEMETRY, Telemetry(client_id=f'proc-{i % 4}', loss=1.0, steps=i, duration_s=0.0,"
        " outcome='succeeded', started_at=now, finished_at=now))\n"
    )
    with make_bus(settings) as bus:
        other = subprocess.Popen(
            [sys.executable, "-c", script, str(path)], env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        )

        def publish_many(thread: int) -> None:
            for steps in range(40):
                bus.publish(Topic.TELEMETRY, telemetry(f"thread-{thread}", steps))

        threads = [threading.Thread(target=publish_many, args=(n,)) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert other.wait(timeout=60) == 0
    with closing(sqlite3.connect(path)) as connection:
        rows = connection.execute("SELECT partition, offset, key FROM records ORDER BY partition, offset").fetchall()
    assert len(rows) == 160
    for partition in {row[0] for row in rows}:
        assert [row[1] for row in rows if row[0] == partition] == list(range(sum(1 for r in rows if r[0] == partition)))
    assert {row[2] for row in rows} == {"thread-0", "thread-1", "thread-2", "proc-0", "proc-1", "proc-2", "proc-3"}


def test_retention_purges_old_records_and_consumers_carry_on(tmp_path: Path) -> None:
    settings = EmbeddedBusSettings(path=tmp_path / "bus.sqlite3", poll_interval_s=0.01)
    with make_bus(settings) as bus:
        for steps in range(3):
            bus.publish(Topic.TELEMETRY, telemetry("edge-1", steps))
        with closing(connect(settings.path)) as connection:
            # Age the first two records past telemetry's 3-day retention.
            connection.execute("UPDATE records SET timestamp_ms = timestamp_ms - 4 * 86400000 WHERE offset < 2")
            assert purge_expired(connection) == 2
        with bus.consumer("late", [Topic.TELEMETRY]) as consumer:
            message = consumer.poll(2.0)
            assert message is not None
            assert isinstance(message.event, Telemetry)
            assert (message.offset, message.event.steps) == (2, 2)


def test_unusable_file_and_missing_topics_raise_bus_errors(tmp_path: Path) -> None:
    with pytest.raises(BusError, match=r"embedded bus .*: cannot open"):
        EmbeddedBus(EmbeddedBusSettings(path=tmp_path))  # a directory, not a file
    settings = EmbeddedBusSettings(path=tmp_path / "bus.sqlite3")
    with make_bus(settings):
        pass
    elsewhere = settings.model_copy(update={"topics": TopicsConfig(prefix="other.")})
    from fednested.messaging.embedded import EmbeddedConsumer

    with pytest.raises(BusError, match=r"topic\(s\) other.telemetry.edge do not exist: run `fednested messaging"):
        EmbeddedConsumer(elsewhere, "g", [Topic.TELEMETRY])
    with make_bus(settings) as bus:
        consumer = bus.consumer("g", [Topic.TELEMETRY])
        consumer.close()
        consumer.close()  # idempotent
        with pytest.raises(BusError, match="consumer of group 'g' is closed"):
            consumer.poll(0.1)
        with pytest.raises(ValueError, match="consumer group id 'bad group' must be"):
            bus.consumer("bad group", [Topic.TELEMETRY])
