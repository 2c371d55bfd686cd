"""Embedded single-machine bus: one SQLite file (WAL) holds per-topic, per-partition logs, consumer-group offsets
and group membership, so the demo's server, workers and device subprocesses share one bus with Kafka's semantics.

Group membership: each consumer heartbeats a row; a member whose process is gone (same host, pid no longer alive)
or that has not polled for `session_timeout_s` is removed, and the partitions are split again among the live
members. A partition is read only by the member whose row in `partition_owners` claims it, and claims are made in
write transactions, so two members of a group never read one partition at the same time.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from fednested.messaging.bus import (
    BootstrapReport,
    Bus,
    BusError,
    Consumer,
    Message,
    TopicOutcome,
    check_group_id,
    describe_duration_ms,
    describe_topic_settings,
    last_per_partition,
    read_message,
)
from fednested.messaging.settings import EmbeddedBusSettings
from fednested.messaging.topics import Topic, TopicsConfig, as_topic
from fednested.observability.tracing import trace_headers_of

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS topics (
    name TEXT PRIMARY KEY,
    partitions INTEGER NOT NULL,
    retention_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS partition_heads (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
);
CREATE TABLE IF NOT EXISTS records (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    headers TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (topic, partition, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_offsets (
    group_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
);
CREATE TABLE IF NOT EXISTS group_members (
    group_id TEXT NOT NULL,
    member_id TEXT NOT NULL,
    topics TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    process_started REAL NOT NULL,
    heartbeat_ms INTEGER NOT NULL,
    PRIMARY KEY (group_id, member_id)
);
CREATE TABLE IF NOT EXISTS partition_owners (
    group_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    member_id TEXT NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
);
"""

# PRAGMA user_version of the layout above. 0: a file made before records had headers (migrate_schema adds them).
SCHEMA_VERSION = 1

# Membership is checked this often while polling; a partition given up by one member is picked up by the next
# within about this delay.
REBALANCE_INTERVAL_S = 0.2
# Expired records are purged once every this many publishes of one bus object (and at every bootstrap).
PURGE_EVERY_PUBLISHES = 256

TopicPartition = tuple[str, int]


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the bus file; autocommit mode, so transactions are explicit `immediate` blocks."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        # WAL lets consumers read while a producer writes. NORMAL: a commit survives any process crash (what the
        # demo's at-least-once needs); only a power cut can lose the last commits, and it cannot corrupt the file.
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.executescript(SCHEMA_SQL)
        migrate_schema(connection)
    except (sqlite3.Error, OSError) as error:
        raise BusError(f"embedded bus {path}: cannot open: {error}") from error
    return connection


def migrate_schema(connection: sqlite3.Connection) -> None:
    """Bring a bus file written by an older version to SCHEMA_VERSION, in one write transaction (so processes
    opening the file together migrate it once): version 1 gave records their headers (trace context)."""
    if int(connection.execute("PRAGMA user_version").fetchone()[0]) >= SCHEMA_VERSION:
        return
    with immediate(connection):
        if int(connection.execute("PRAGMA user_version").fetchone()[0]) >= SCHEMA_VERSION:
            return
        columns = {str(row[1]) for row in connection.execute("PRAGMA table_info(records)").fetchall()}
        if "headers" not in columns:
            connection.execute("ALTER TABLE records ADD COLUMN headers TEXT NOT NULL DEFAULT '[]'")
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def stored_headers(text: str) -> tuple[tuple[str, str], ...]:
    """A record's headers column read back: only well-formed trace-context headers survive, whatever was stored."""
    try:
        pairs = json.loads(text)
    except ValueError:
        return ()
    if not isinstance(pairs, list):
        return ()
    candidates = [(pair[0], pair[1]) for pair in pairs if isinstance(pair, list) and len(pair) == 2]
    return tuple(sorted(trace_headers_of(candidates).items()))


@contextmanager
def immediate(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction that takes the write lock up front, so read-then-write steps cannot interleave."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def now_ms() -> int:
    return int(time.time() * 1000)


def partition_for_key(key: str, partitions: int) -> int:
    """CRC32 of the key modulo the partition count: stable across processes, like librdkafka's default."""
    return zlib.crc32(key.encode()) % partitions


def append_record(
    connection: sqlite3.Connection,
    physical_topic: str,
    key: str,
    raw: bytes,
    headers: tuple[tuple[str, str], ...] = (),
) -> tuple[int, int]:
    """Append one record inside the caller's transaction; returns (partition, offset). Does not validate `raw`."""
    row = connection.execute("SELECT partitions FROM topics WHERE name = ?", (physical_topic,)).fetchone()
    if row is None:
        raise BusError(f"topic {physical_topic!r} does not exist: run `fednested messaging bootstrap-topics`")
    partition = partition_for_key(key, int(row[0]))
    head = connection.execute(
        "UPDATE partition_heads SET next_offset = next_offset + 1 WHERE topic = ? AND partition = ? "
        "RETURNING next_offset - 1",
        (physical_topic, partition),
    ).fetchone()
    offset = int(head[0])
    connection.execute(
        "INSERT INTO records (topic, partition, offset, key, value, timestamp_ms, headers) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (physical_topic, partition, offset, key, raw, now_ms(), json.dumps([list(pair) for pair in headers])),
    )
    return partition, offset


def write_raw_record(path: Path, physical_topic: str, key: str, raw: bytes) -> tuple[int, int]:
    """Append bytes without validation, for replaying archived records and for testing consumer-side rejection."""
    with closing(connect(path)) as connection, immediate(connection):
        return append_record(connection, physical_topic, key, raw)


def purge_expired(connection: sqlite3.Connection) -> int:
    """Delete records older than their topic's retention; returns how many. Committed offsets stay valid."""
    deleted = 0
    cutoff_base = now_ms()
    for name, retention_ms in connection.execute("SELECT name, retention_ms FROM topics").fetchall():
        cursor = connection.execute(
            "DELETE FROM records WHERE topic = ? AND timestamp_ms < ?", (name, cutoff_base - int(retention_ms))
        )
        deleted += cursor.rowcount
    return deleted


def align_topics(connection: sqlite3.Connection, topics: TopicsConfig, *, alter_existing: bool) -> list[TopicOutcome]:
    """Create missing topics; with `alter_existing`, also grow partitions and set retention to the configuration."""
    outcomes = []
    for topic in Topic:
        name = topics.physical_name(topic)
        wanted = topics.settings_for(topic)
        row = connection.execute("SELECT partitions, retention_ms FROM topics WHERE name = ?", (name,)).fetchone()
        if row is None:
            connection.execute(
                "INSERT INTO topics (name, partitions, retention_ms) VALUES (?, ?, ?)",
                (name, wanted.partitions, wanted.retention_ms),
            )
            _add_partition_heads(connection, name, range(wanted.partitions))
            outcomes.append(
                TopicOutcome(
                    name, created=True, changes=(describe_topic_settings(wanted.partitions, wanted.retention_ms),)
                )
            )
            continue
        partitions, retention_ms = int(row[0]), int(row[1])
        changes: list[str] = []
        warnings: list[str] = []
        if alter_existing and wanted.partitions > partitions:
            _add_partition_heads(connection, name, range(partitions, wanted.partitions))
            connection.execute("UPDATE topics SET partitions = ? WHERE name = ?", (wanted.partitions, name))
            changes.append(f"partitions {partitions} → {wanted.partitions} (keys map anew from here on)")
        elif wanted.partitions < partitions:
            warnings.append(
                f"has {partitions} partitions, the configuration asks for {wanted.partitions}; "
                f"partitions cannot be removed, left at {partitions}"
            )
        if alter_existing and wanted.retention_ms != retention_ms:
            connection.execute("UPDATE topics SET retention_ms = ? WHERE name = ?", (wanted.retention_ms, name))
            changes.append(
                f"retention {describe_duration_ms(retention_ms)} → {describe_duration_ms(wanted.retention_ms)}"
            )
        outcomes.append(TopicOutcome(name, changes=tuple(changes), warnings=tuple(warnings)))
    return outcomes


def _add_partition_heads(connection: sqlite3.Connection, name: str, partitions: range) -> None:
    connection.executemany(
        "INSERT INTO partition_heads (topic, partition, next_offset) VALUES (?, ?, 0)",
        [(name, partition) for partition in partitions],
    )


def bootstrap_embedded_topics(settings: EmbeddedBusSettings) -> BootstrapReport:
    """Create or align the four topics in the bus file, and purge expired records."""
    with closing(connect(settings.path)) as connection, immediate(connection):
        outcomes = align_topics(connection, settings.topics, alter_existing=True)
        purge_expired(connection)
    return BootstrapReport(target=f"embedded bus {settings.path}", topics=tuple(outcomes))


class EmbeddedBus(Bus):
    """Bus on an SQLite file; safe to share between threads of a process and between processes of a machine.

    Opening it creates the file and any missing topics (with the configured partitions), so the demo needs no
    setup step; existing topics are altered only by `bootstrap_topics`.
    """

    def __init__(self, settings: EmbeddedBusSettings) -> None:
        super().__init__(settings.topics)
        self.settings = settings
        self._connection: sqlite3.Connection | None = connect(settings.path)
        self._lock = threading.Lock()
        self._publishes = 0
        with self._lock, immediate(self._connection):
            align_topics(self._connection, settings.topics, alter_existing=False)

    @property
    def system(self) -> str:
        return "embedded"

    def _produce(self, topic: Topic, key: str, raw: bytes, headers: tuple[tuple[str, str], ...]) -> None:
        with self._lock:
            if self._connection is None:
                raise BusError(f"embedded bus {self.settings.path} is closed")
            try:
                with immediate(self._connection):
                    append_record(self._connection, self.topics.physical_name(topic), key, raw, headers)
                    self._publishes += 1
                    if self._publishes % PURGE_EVERY_PUBLISHES == 0:
                        purge_expired(self._connection)
            except sqlite3.Error as error:
                raise BusError(
                    f"embedded bus {self.settings.path}: publish to {topic.value} failed: {error}"
                ) from error

    def consumer(self, group: str, topics: Sequence[Topic | str]) -> EmbeddedConsumer:
        return EmbeddedConsumer(self.settings, check_group_id(group), [as_topic(topic) for topic in topics])

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None


@dataclass(frozen=True)
class _Member:
    member_id: str
    topics: frozenset[str]
    host: str
    pid: int
    process_started: float
    heartbeat_ms: int


def assign_partitions(
    members: Sequence[tuple[str, frozenset[str]]], partitions: dict[str, int]
) -> dict[str, set[TopicPartition]]:
    """Split every subscribed topic's partitions among the members that subscribe to it; pure and deterministic.

    Each partition, in topic and partition order, goes to the least-loaded member subscribed to its topic (ties
    by member id), so members end up with nearly equal shares across topics.
    """
    assignment: dict[str, set[TopicPartition]] = {member_id: set() for member_id, _ in members}
    for topic in sorted(partitions):
        candidates = sorted(member_id for member_id, topics in members if topic in topics)
        for partition in range(partitions[topic] if candidates else 0):
            owner = min(candidates, key=lambda member_id: (len(assignment[member_id]), member_id))
            assignment[owner].add((topic, partition))
    return assignment


def _process_alive(pid: int, started: float) -> bool:
    try:
        process = psutil.Process(pid)
        # The start time tells a reused pid from the original process; a zombie is a killed, unreaped process.
        return abs(process.create_time() - started) < 0.01 and bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


class EmbeddedConsumer(Consumer):
    """A consumer-group member on the embedded bus. Use from one thread."""

    def __init__(self, settings: EmbeddedBusSettings, group: str, topics: list[Topic]) -> None:
        if not topics:
            raise ValueError("a consumer needs at least one topic")
        self.settings = settings
        self.group = group
        self._topics_config = settings.topics
        self._subscribed = frozenset(self._topics_config.physical_name(topic) for topic in topics)
        self._connection: sqlite3.Connection | None = connect(settings.path)
        existing = {row[0] for row in self._connection.execute("SELECT name FROM topics").fetchall()}
        missing = sorted(self._subscribed - existing)
        if missing:
            self._connection.close()
            raise BusError(
                f"embedded bus {settings.path}: topic(s) {', '.join(missing)} do not exist: "
                "run `fednested messaging bootstrap-topics`"
            )
        self._member_id = uuid.uuid4().hex
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self._process_started = psutil.Process(self._pid).create_time()
        self._owned: list[TopicPartition] = []
        self._positions: dict[TopicPartition, int] = {}
        self._rotation = 0
        self._next_rebalance = 0.0
        self._last_heartbeat_ms = 0
        self._session_timeout_ms = int(settings.session_timeout_s * 1000)

    def _live_connection(self) -> sqlite3.Connection:
        if self._connection is None:
            raise BusError(f"consumer of group {self.group!r} is closed")
        return self._connection

    def poll(self, timeout_s: float) -> Message | None:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            if time.monotonic() >= self._next_rebalance:
                self._rebalance()
                self._next_rebalance = time.monotonic() + REBALANCE_INTERVAL_S
            message = self._fetch_next()
            if message is not None:
                return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(self.settings.poll_interval_s, remaining, max(self._next_rebalance - time.monotonic(), 0)))

    def _fetch_next(self) -> Message | None:
        connection = self._live_connection()
        count = len(self._owned)
        for step in range(count):
            topic_partition = self._owned[(self._rotation + step) % count]
            row = connection.execute(
                "SELECT offset, key, value, timestamp_ms, headers FROM records "
                "WHERE topic = ? AND partition = ? AND offset >= ? ORDER BY offset LIMIT 1",
                (topic_partition[0], topic_partition[1], self._positions[topic_partition]),
            ).fetchone()
            if row is None:
                continue
            offset, key, value, timestamp_ms = int(row[0]), str(row[1]), bytes(row[2]), int(row[3])
            self._positions[topic_partition] = offset + 1
            # Start the next fetch at the following partition, so one busy partition cannot starve the others.
            self._rotation = (self._rotation + step + 1) % count
            logical = self._topics_config.logical_topic(topic_partition[0])
            headers = stored_headers(str(row[4]))
            return read_message(logical, topic_partition[1], offset, key, value, timestamp_ms, headers)
        return None

    def commit(self, message: Message) -> None:
        self.commit_batch([message])

    def commit_batch(self, messages: Sequence[Message]) -> None:
        connection = self._live_connection()
        rows = []
        for message in last_per_partition(messages):
            physical = self._topics_config.physical_name(message.topic)
            if physical not in self._subscribed:
                raise ValueError(f"message from {message.where()} is not from a topic this consumer subscribes to")
            rows.append((self.group, physical, message.partition, message.offset + 1))
        # One transaction for the batch's partitions. max(): a late commit from a member that lost the partition
        # never moves the group's offset backwards.
        with immediate(connection):
            connection.executemany(
                "INSERT INTO group_offsets (group_id, topic, partition, next_offset) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (group_id, topic, partition) "
                "DO UPDATE SET next_offset = max(next_offset, excluded.next_offset)",
                rows,
            )

    def assignment(self) -> list[tuple[Topic, int]]:
        if self._connection is not None and time.monotonic() >= self._next_rebalance:
            self._rebalance()
            self._next_rebalance = time.monotonic() + REBALANCE_INTERVAL_S
        return sorted((self._topics_config.logical_topic(name), partition) for name, partition in self._owned)

    def close(self) -> None:
        if self._connection is None:
            return
        with immediate(self._connection):
            self._connection.execute(
                "DELETE FROM partition_owners WHERE group_id = ? AND member_id = ?", (self.group, self._member_id)
            )
            self._connection.execute(
                "DELETE FROM group_members WHERE group_id = ? AND member_id = ?", (self.group, self._member_id)
            )
        self._connection.close()
        self._connection = None

    def _members(self, connection: sqlite3.Connection) -> list[_Member]:
        rows = connection.execute(
            "SELECT member_id, topics, host, pid, process_started, heartbeat_ms FROM group_members WHERE group_id = ?",
            (self.group,),
        ).fetchall()
        return [
            _Member(str(r[0]), frozenset(json.loads(r[1])), str(r[2]), int(r[3]), float(r[4]), int(r[5])) for r in rows
        ]

    def _is_dead(self, member: _Member, at_ms: int) -> bool:
        if member.member_id == self._member_id:
            return False
        if at_ms - member.heartbeat_ms > self._session_timeout_ms:
            return True
        return member.host == self._host and not _process_alive(member.pid, member.process_started)

    def _desired(self, connection: sqlite3.Connection, live: list[_Member]) -> set[TopicPartition]:
        subscribed_by_any = set().union(*(member.topics for member in live)) | self._subscribed
        partitions = {
            str(name): int(count)
            for name, count in connection.execute("SELECT name, partitions FROM topics").fetchall()
            if name in subscribed_by_any
        }
        members = [(member.member_id, member.topics) for member in live if member.member_id != self._member_id]
        members.append((self._member_id, self._subscribed))
        return assign_partitions(members, partitions)[self._member_id]

    def _owned_now(self, connection: sqlite3.Connection) -> set[TopicPartition]:
        rows = connection.execute(
            "SELECT topic, partition FROM partition_owners WHERE group_id = ? AND member_id = ?",
            (self.group, self._member_id),
        ).fetchall()
        return {(str(topic), int(partition)) for topic, partition in rows}

    def _rebalance(self) -> None:
        """Heartbeat, drop dead members, and release or claim partitions to match the current assignment.

        A read-only look first: the write transaction is taken only when something must change or a heartbeat
        is due, so idle consumers do not contend for the write lock.
        """
        connection = self._live_connection()
        at_ms = now_ms()
        members = self._members(connection)
        joined = any(member.member_id == self._member_id for member in members)
        live = [member for member in members if not self._is_dead(member, at_ms)]
        heartbeat_due = at_ms - self._last_heartbeat_ms >= self._session_timeout_ms // 4
        owned = self._owned_now(connection)
        if joined and len(live) == len(members) and not heartbeat_due and owned == self._desired(connection, live):
            self._apply_ownership(connection, owned, rejoined=False)
            return
        with immediate(connection):
            at_ms = now_ms()
            members = self._members(connection)
            rejoined = not any(member.member_id == self._member_id for member in members)
            for member in members:
                if self._is_dead(member, at_ms):
                    connection.execute(
                        "DELETE FROM group_members WHERE group_id = ? AND member_id = ?", (self.group, member.member_id)
                    )
                    connection.execute(
                        "DELETE FROM partition_owners WHERE group_id = ? AND member_id = ?",
                        (self.group, member.member_id),
                    )
            connection.execute(
                "INSERT INTO group_members (group_id, member_id, topics, host, pid, process_started, heartbeat_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (group_id, member_id) DO UPDATE SET heartbeat_ms = excluded.heartbeat_ms",
                (
                    self.group,
                    self._member_id,
                    json.dumps(sorted(self._subscribed)),
                    self._host,
                    self._pid,
                    self._process_started,
                    at_ms,
                ),
            )
            live = [member for member in self._members(connection) if not self._is_dead(member, at_ms)]
            desired = self._desired(connection, live)
            for topic, partition in self._owned_now(connection) - desired:
                connection.execute(
                    "DELETE FROM partition_owners WHERE group_id = ? AND topic = ? AND partition = ?",
                    (self.group, topic, partition),
                )
            # A partition still held by another live member is claimed on a later round, once it lets go.
            connection.executemany(
                "INSERT OR IGNORE INTO partition_owners (group_id, topic, partition, member_id) VALUES (?, ?, ?, ?)",
                [(self.group, topic, partition, self._member_id) for topic, partition in sorted(desired)],
            )
            owned = self._owned_now(connection)
            self._apply_ownership(connection, owned, rejoined=rejoined)
        self._last_heartbeat_ms = at_ms

    def _apply_ownership(self, connection: sqlite3.Connection, owned: set[TopicPartition], *, rejoined: bool) -> None:
        """Keep read positions of partitions held throughout; start gained ones at the group's committed offset."""
        if rejoined:
            # Removed from the group meanwhile: another member may have read on, so nothing in memory is trusted.
            self._positions = {}
        positions = {}
        for topic_partition in sorted(owned):
            if topic_partition in self._positions:
                positions[topic_partition] = self._positions[topic_partition]
                continue
            row = connection.execute(
                "SELECT next_offset FROM group_offsets WHERE group_id = ? AND topic = ? AND partition = ?",
                (self.group, *topic_partition),
            ).fetchone()
            positions[topic_partition] = int(row[0]) if row is not None else 0
        self._positions = positions
        self._owned = sorted(owned)
