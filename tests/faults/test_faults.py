"""Fault injection on the real services (issue #13): workers killed with SIGKILL at random and at named points,
Kafka and PostgreSQL restarted mid-round, the artifact store refusing writes. After each fault the workers are
restarted as a supervisor would, the window completes, and the invariants hold (tests/faults/harness.py): every
accepted update applied exactly once or still buffered, none lost, no half-registered version, every event on the
bus once per event id. Seeds are printed; FEDNESTED_FAULTS_SEED=<n> replays a run. docs/operations/faults.md.
"""

import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.db import connections

from apps.federation.choices import RoundStatus, TaskKind, TaskStatus, UpdateStatus
from apps.federation.models import Round, TrainingTask, Update
from apps.federation.services import create_training_task
from apps.registry.models import ModelVersion
from fednested.messaging import UpdateEnvelope
from tests.faults.harness import Harness, TrialRow, relay_available, task_state
from workers.aggregation import CRASH_POINT_ENV as AGGREGATION_CRASH_POINT_ENV
from workers.aggregation import candidate_version_id
from workers.ingest.consumer import CRASH_POINT_ENV as INGEST_CRASH_POINT_ENV

pytestmark = [
    pytest.mark.faults,
    pytest.mark.services,
    pytest.mark.kafka,
    pytest.mark.slow,
    pytest.mark.timeout(900),
]

# Kill trials: at least 20 in all, spread over the workers there are.
KILL_TRIALS = 21
# What a trial does to the system once its window exists; returns where the fault landed.
Injector = Callable[[Round, list[UpdateEnvelope]], str]
BASE_SEED = int(os.environ.get("FEDNESTED_FAULTS_SEED", "0")) or random.SystemRandom().randrange(1, 10**6)


def run_trial(harness: Harness, trial: str, seed: int | None, fault: str, inject: Injector) -> None:
    """One window under one fault: publish its K updates, inject, let the supervisor restart what died, wait for
    the candidate, check the invariants, decide the candidate so the next window can go on. Recorded in the table
    also when it fails."""
    harness.wait_ready()
    window = harness.open_window()
    envelopes = harness.updates_for(window, seed if seed is not None else random.randrange(10**6))
    begun = time.monotonic()
    point = "?"
    try:
        point = inject(window, envelopes)
        candidate = harness.wait_for(
            f"window {window.round_id} to complete", lambda: harness.window_done(window, envelopes)
        )
        summary = harness.check_invariants()
        harness.decide(candidate)
    except BaseException as error:
        harness.record(
            TrialRow(trial, seed, fault, point, f"FAILED: {str(error).splitlines()[0][:90]}", time.monotonic() - begun)
        )
        raise
    harness.record(TrialRow(trial, seed, fault, point, f"ok: {summary}", time.monotonic() - begun))


def recorded(window: Round) -> int:
    return Update.objects.filter(round=window).count()


def wait_for_task(harness: Harness, window: Round) -> TrainingTask:
    return harness.wait_for(
        f"an aggregation task for {window.round_id}",
        lambda: TrainingTask.objects.filter(round=window, kind=TaskKind.EXPERT_AGGREGATION).order_by("id").first(),
        timeout_s=60,
    )


def test_workers_killed_at_random_points_recover_without_loss_or_double_apply(harness: Harness) -> None:
    targets = ["ingest-worker", "celery-worker", *(["relay"] if relay_available() else [])]
    print(f"fault suite base seed: {BASE_SEED} (replay with FEDNESTED_FAULTS_SEED={BASE_SEED})")
    for index in range(KILL_TRIALS):
        seed = BASE_SEED + index
        rng = random.Random(seed)
        target = targets[index % len(targets)]

        def inject(
            window: Round, envelopes: list[UpdateEnvelope], target: str = target, rng: random.Random = rng
        ) -> str:
            harness.publish(envelopes)
            if target == "celery-worker":
                # Anchored on the aggregation task, so the kill lands before, in or after the aggregation.
                wait_for_task(harness, window)
                delay = rng.uniform(0.0, 3.0)
                time.sleep(delay)
                where = f"task+{delay:.2f}s, task {task_state(window)}"
            else:
                delay = rng.uniform(0.0, 1.5)
                time.sleep(delay)
                where = f"publish+{delay:.2f}s, {recorded(window)}/{len(envelopes)} recorded, task {task_state(window)}"
            harness.kill(target)
            return where

        run_trial(harness, f"kill-{index + 1:02d}", seed, f"kill -9 {target}", inject)
    kills = sum(1 for row in harness.rows if row.fault.startswith("kill -9"))
    assert kills >= 20


@contextmanager
def hooked(harness: Harness, worker: str, env_name: str, point: str) -> Iterator[None]:
    """`worker` restarted with its crash hook at `point`: it kills itself there, and the supervisor starts it
    again without the hook."""
    harness.kill(worker)
    harness.start(worker, **{env_name: point})
    yield


def hooked_process_died(harness: Harness, worker: str) -> None:
    """Wait until the hooked incarnation of `worker` killed itself (the supervisor then starts the next one)."""
    process = harness.workers[worker].process
    assert process is not None
    harness.wait_for(f"the hooked {worker} to kill itself", lambda: True if not process.running else None)
    assert process.popen.returncode == -9, process.log_tail()


@pytest.mark.parametrize("point", ["after_claim", "after_files_written", "after_files_moved", "after_register"])
def test_aggregation_worker_killed_at_each_step_of_registering(harness: Harness, point: str) -> None:
    """Bad input: the worker dies between writing a candidate's files and registering it (and around that). The
    window is presumed lost after FEDNESTED_AGGREGATION_TIMEOUT_S, reopened, and aggregated again; the leftover
    files are replaced, never registered; nothing is applied twice."""

    def inject(window: Round, envelopes: list[UpdateEnvelope]) -> str:
        with hooked(harness, "celery-worker", AGGREGATION_CRASH_POINT_ENV, point):
            harness.wait_ready()
            harness.publish(envelopes)
            hooked_process_died(harness, "celery-worker")
        version_id = candidate_version_id(window)
        versions = Path(harness.world.root) / "versions"
        registered = ModelVersion.objects.filter(version_id=version_id).exists()
        staged = sorted(p.name for p in versions.glob(f".{version_id}.task-*"))
        in_place = (versions / version_id).exists()
        if point == "after_register":
            assert registered
            assert in_place
            assert set(Update.objects.filter(round=window).values_list("status", flat=True)) == {UpdateStatus.APPLIED}
        else:
            assert not registered
            assert set(Update.objects.filter(round=window).values_list("status", flat=True)) == {UpdateStatus.BUFFERED}
            assert bool(staged) == (point == "after_files_written"), staged
            assert in_place == (point == "after_files_moved")
        return f"{point}: registered={registered} staged={len(staged)} in_place={in_place}"

    run_trial(harness, f"hook-{point}", None, "aggregation crash hook", inject)


def test_ingest_worker_killed_between_db_commit_and_offset_commit(harness: Harness) -> None:
    def inject(window: Round, envelopes: list[UpdateEnvelope]) -> str:
        with hooked(harness, "ingest-worker", INGEST_CRASH_POINT_ENV, "after_db_commit"):
            harness.wait_ready()
            harness.publish(envelopes)
            hooked_process_died(harness, "ingest-worker")
        return f"after_db_commit: {recorded(window)}/{len(envelopes)} recorded"

    run_trial(harness, "hook-ingest-after_db_commit", None, "ingest crash hook", inject)


def test_relay_killed_between_publish_and_marking_sent(harness: Harness) -> None:
    if not relay_available():
        pytest.skip("workers/relay is not in this checkout yet: no outbox relay to kill")
    from workers.relay.relay import CRASH_POINT_ENV as RELAY_CRASH_POINT_ENV

    def inject(window: Round, envelopes: list[UpdateEnvelope]) -> str:
        with hooked(harness, "relay", RELAY_CRASH_POINT_ENV, "after_publish"):
            harness.wait_ready()
            harness.publish(envelopes)
            hooked_process_died(harness, "relay")
        return f"after_publish: task {task_state(window)}"

    run_trial(harness, "hook-relay-after_publish", None, "relay crash hook", inject)


def test_kafka_restarted_mid_round(harness: Harness) -> None:
    def inject(window: Round, envelopes: list[UpdateEnvelope]) -> str:
        harness.publish(envelopes)
        state = f"{recorded(window)}/{len(envelopes)} recorded"
        seconds = harness.services.restart("kafka")
        return f"after publish, {state}; broker down {seconds:.1f}s"

    run_trial(harness, "kafka-restart", None, "restart Kafka", inject)


def test_postgres_restarted_during_an_aggregation(harness: Harness) -> None:
    """Bad input: PostgreSQL goes away while the window is being aggregated. The aggregation fails (or is presumed
    lost), the workers that exit on the lost database are restarted, and the window is aggregated again."""

    def inject(window: Round, envelopes: list[UpdateEnvelope]) -> str:
        harness.publish(envelopes)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            window.refresh_from_db(fields=["status"])
            if window.status != RoundStatus.OPEN:
                break
            time.sleep(0.02)
        assert window.status == RoundStatus.AGGREGATING, f"window {window.round_id} is {window.status}, not aggregating"
        connections["default"].close()
        seconds = harness.services.restart("postgres")
        return f"window aggregating; database down {seconds:.1f}s"

    run_trial(harness, "postgres-restart", None, "restart PostgreSQL", inject)


@contextmanager
def refusing_writes(directory: Path) -> Iterator[str]:
    """`directory` refuses new entries: immutable (chattr +i) as root, whom permissions do not stop; read-only
    otherwise. Undone on the way out whatever happens."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(directory)], check=True)
        how = "chattr +i"
    else:
        directory.chmod(0o555)
        how = "chmod 555"
    try:
        yield how
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        else:
            directory.chmod(0o755)


def test_artifact_store_refusing_writes(harness: Harness) -> None:
    def inject(window: Round, envelopes: list[UpdateEnvelope]) -> str:
        versions = Path(harness.world.root) / "versions"
        with refusing_writes(versions) as how:
            harness.publish(envelopes)
            failed = harness.wait_for(
                "an aggregation that fails on the store",
                lambda: TrainingTask.objects.filter(round=window, status=TaskStatus.FAILED).first(),
                timeout_s=90,
            )
            window.refresh_from_db()
            # Nothing half-done: the window is open again with its updates buffered, no version registered.
            assert window.status == RoundStatus.OPEN
            assert set(Update.objects.filter(round=window).values_list("status", flat=True)) == {UpdateStatus.BUFFERED}
            assert not ModelVersion.objects.filter(version_id=candidate_version_id(window)).exists()
            harness.check_invariants()
        # A repeated failure waits for an engineer (three attempts): the engineer retries once the disk is fixed.
        if not TrainingTask.objects.filter(round=window, status__in=[TaskStatus.PENDING, TaskStatus.RUNNING]).exists():
            attempts = TrainingTask.objects.filter(round=window, status=TaskStatus.FAILED).count()
            if attempts >= 3:
                create_training_task(
                    kind=TaskKind.EXPERT_AGGREGATION,
                    actor=harness.world.engineer,
                    round_=window,
                    params={"round_id": window.round_id, "trigger": "manual"},
                )
        return f"{how} on versions/; failed: {failed.error[:40]}"

    run_trial(harness, "store-refuses-writes", None, "artifact store refuses writes", inject)
