"""Tier-1 jobs through POST /api/v1/tasks/: params and references checked at creation (400 naming the field, nothing
created), and in the embedded mode every job runs in the jobs thread after commit, never inside the request."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.db import connection
from rest_framework.test import APIClient

from apps.accounts.services import issue_api_token
from apps.federation.choices import RoundStatus, TaskKind, TaskStatus, parse_task_run_ref, task_run_ref
from apps.federation.jobs import IN_PROCESS, JOBS, AggregationParams, EvaluationParams, JobKind
from apps.federation.models import Round, TrainingTask
from apps.federation.services import close_round
from apps.governance.actors import Actor
from apps.governance.models import ApprovalRequest
from controlplane.celery import app as celery_app
from tests.federation_world import WorkerWorld
from workers.evaluation import evaluate_version_task

# How long a test waits for the jobs thread to finish what it was given (the tiny model scores in seconds).
JOBS_TIMEOUT_S = 120.0


@pytest.fixture
def engineer(world: WorkerWorld) -> APIClient:
    _, token = issue_api_token(world.engineer, actor=Actor.automation("tests"), name="tests")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return client


def post_task(client: APIClient, body: dict[str, Any]) -> Any:
    return client.post("/api/v1/tasks/", body, format="json")


# --- checked at creation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "version_id: required — The registered version to score (its parent is scored too)."),
        ({"version_id": 5}, "version_id: Input should be a valid string, got 5"),
        ({"version_id": "v9"}, "version_id: unknown version 'v9'"),
        ({"version_id": "../v1"}, "version_id: String should match pattern"),
        ({"version_id": "v1", "steps": 3}, "steps: not a parameter of evaluation tasks (they take version_id, "),
        ({"version_id": "v1", "seq_len": "256"}, "seq_len: Input should be a valid integer, got '256'"),
        ({"version_id": "v1", "seq_len": True}, "seq_len: Input should be a valid integer, got True"),
        ({"version_id": "v1", "seq_len": 1}, "seq_len: Input should be greater than or equal to 2, got 1"),
        ({"version_id": "v1", "heldout_dir": "../outside"}, "heldout_dir: '../outside' points outside the artifact"),
        ({"version_id": "v1", "heldout_dir": "versions"}, "heldout_dir: no held-out sets (<domain>.jsonl) in 'ver"),
        ({"version_id": "v1", "round_id": "r"}, "round_id: not a parameter of evaluation tasks"),
    ],
)
def test_an_evaluation_with_bad_params_is_a_400_naming_the_param(
    world: WorkerWorld, engineer: APIClient, params: dict[str, Any], message: str
) -> None:
    response = post_task(engineer, {"kind": "evaluation", "params": params})
    assert response.status_code == 400, response.content
    body = response.json()
    assert set(body) == {"params", "code"}
    assert any(line.startswith(message) for line in body["params"]), body
    assert not TrainingTask.objects.exists()


def test_every_bad_param_is_named_at_once(world: WorkerWorld, engineer: APIClient) -> None:
    response = post_task(engineer, {"kind": "evaluation", "params": {"version_id": "v9", "heldout_dir": "nowhere"}})
    assert response.status_code == 400
    assert response.json()["params"] == [
        "version_id: unknown version 'v9'",
        "heldout_dir: no held-out sets (<domain>.jsonl) in 'nowhere' of the artifact store",
    ]


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({}, "round", "an expert_aggregation task needs the round (window) it aggregates"),
        ({"round": "nope"}, "round", "Object with round_id=nope does not exist."),
        ({"round": "{open}", "params": {"steps": 1}}, "params", "steps: not a parameter of expert_aggregation tasks"),
        ({"round": "{open}", "params": {"trigger": 5}}, "params", "trigger: Input should be a valid string, got 5"),
        ({"round": "{open}", "params": {"trigger": "Full!"}}, "params", "trigger: String should match pattern"),
        ({"round": "{open}", "params": {"round_id": "other"}}, "params", "round_id: 'other' is not the task's round"),
        ({"round": "{open}", "params": ["trigger"]}, "params", "params must be a JSON object, got list"),
        ({"round": "{closed}"}, "round", "round '{closed}' is closed: only an open window can be aggregated"),
    ],
)
def test_an_aggregation_with_a_bad_round_or_params_is_a_400_naming_the_field(
    world: WorkerWorld, engineer: APIClient, body: dict[str, Any], field: str, message: str
) -> None:
    ids = {"open": world.open_round().round_id, "closed": world.open_round().round_id}
    close_round(Round.objects.get(round_id=ids["closed"]), actor=world.engineer, reason="done")
    body = {key: value.format(**ids) if isinstance(value, str) else value for key, value in body.items()}
    before = TrainingTask.objects.count()
    response = post_task(engineer, {"kind": "expert_aggregation", **body})
    assert response.status_code == 400, response.content
    errors = response.json()
    assert field in errors, errors
    assert any(str(line).startswith(message.format(**ids)) for line in errors[field]), errors
    assert TrainingTask.objects.count() == before == 0


def test_a_core_update_without_datasets_is_a_400_naming_the_param(world: WorkerWorld, engineer: APIClient) -> None:
    # The rest of core_update's params and settings: tests/workers/test_core_update_task.py.
    response = post_task(engineer, {"kind": "core_update", "params": {}})
    assert response.status_code == 400
    assert response.json()["params"] == [
        "datasets: required — Tier-1 JSONL datasets: paths inside the artifact store (relative or artifacts://), each "
        "read only if the dataset policies (FEDNESTED_DATASET_POLICIES) allow the job's service principal."
    ]
    assert not TrainingTask.objects.exists()


def test_every_job_kind_has_a_run_name_that_parses_back_to_it() -> None:
    """The run name the workers write in lineage is the one the MLflow and DataHub mirrors and the console parse."""
    assert task_run_ref(TaskKind.CORE_UPDATE, 7) == "core-update-task-7"
    assert task_run_ref(TaskKind.EXPERT_AGGREGATION, 12) == "aggregation-task-12"
    assert {kind: parse_task_run_ref(task_run_ref(kind, 41)) for kind in JOBS} == {kind: (kind, 41) for kind in JOBS}
    # Names no job of ours made: another prefix, a pk past the 18 digits a database integer holds, trailing text.
    for foreign in ("bootstrap-task-1", "evaluation-task-" + "9" * 19, "core-update-task-3/x", "core-update-task-"):
        assert parse_task_run_ref(foreign) is None, foreign
    with pytest.raises(ValueError, match="no run name for task kind 'training'"):
        task_run_ref("training", 1)


def test_every_job_kind_names_a_registered_worker_task() -> None:
    celery_app.loader.import_default_modules()
    assert {kind: job.task_name in celery_app.tasks for kind, job in JOBS.items()} == {
        TaskKind.CORE_UPDATE: True,
        TaskKind.EXPERT_AGGREGATION: True,
        TaskKind.EVALUATION: True,
    }


# --- run after commit, outside the request ---------------------------------------------------------------------------

job_gate = threading.Event()
job_started = threading.Event()


@celery_app.task(name="tests.federation.gated_evaluation")
def gated_evaluation(task_pk: int) -> int | None:
    """The real evaluation, once the test opens the gate: the test can see where the job runs and when."""
    job_started.set()
    if not job_gate.wait(30):
        raise RuntimeError(f"task {task_pk}: the test never opened the gate")
    result: int | None = evaluate_version_task(task_pk)
    return result


def connections_to_the_test_database() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
        row = cursor.fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.django_db(transaction=True)
def test_a_request_returns_before_its_job_runs_and_the_job_then_completes(
    world: WorkerWorld, engineer: APIClient, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.FEDNESTED_JOBS_IN_PROCESS = True
    monkeypatch.setitem(JOBS, TaskKind.EVALUATION, JobKind("tests.federation.gated_evaluation", EvaluationParams))
    job_gate.clear()
    job_started.clear()
    started = time.monotonic()
    response = post_task(engineer, {"kind": "evaluation", "params": {"version_id": "v1"}})
    elapsed = time.monotonic() - started
    try:
        assert response.status_code == 201, response.content
        assert response.json()["status"] == TaskStatus.PENDING
        # The job began in the jobs thread (the row had committed) and waits at the gate: the request did not wait.
        assert job_started.wait(10), "the job never started"
        assert elapsed < 10, f"the request took {elapsed:.1f} s"
        assert TrainingTask.objects.get(pk=response.json()["id"]).status == TaskStatus.PENDING
    finally:
        job_gate.set()
    assert IN_PROCESS.wait_idle(JOBS_TIMEOUT_S), f"the evaluation still runs after {JOBS_TIMEOUT_S:.0f} s"
    task = TrainingTask.objects.get(pk=response.json()["id"])
    assert (task.status, task.error) == (TaskStatus.SUCCEEDED, "")
    assert ApprovalRequest.objects.filter(version=world.base).count() == 1
    assert sorted(world.base.evaluations.values_list("domain", flat=True)) == ["medical", "recipes"]
    if connection.vendor == "postgresql":
        # The jobs thread closed its own connection: only this test's is left.
        deadline = time.monotonic() + 10
        while connections_to_the_test_database() > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert connections_to_the_test_database() == 1


@pytest.mark.django_db(transaction=True)
def test_a_valid_aggregation_is_created_and_its_job_runs(
    world: WorkerWorld, engineer: APIClient, settings: Any
) -> None:
    settings.FEDNESTED_JOBS_IN_PROCESS = True
    round_ = world.open_round()
    response = post_task(
        engineer, {"kind": "expert_aggregation", "round": round_.round_id, "params": {"trigger": "deadline"}}
    )
    assert response.status_code == 201, response.content
    assert response.json()["params"] == {"trigger": "deadline"}
    assert IN_PROCESS.wait_idle(JOBS_TIMEOUT_S)
    assert TrainingTask.objects.get(pk=response.json()["id"]).status == TaskStatus.SUCCEEDED
    # Nothing was buffered: the job cancelled the window and opened the next of its series.
    round_.refresh_from_db()
    assert round_.status == RoundStatus.CANCELLED
    assert Round.objects.filter(series=round_.series, sequence=2, status=RoundStatus.OPEN).exists()


@pytest.mark.django_db(transaction=True)
def test_a_job_whose_worker_task_is_missing_fails_on_its_row(
    world: WorkerWorld, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from apps.federation.services import create_training_task

    settings.FEDNESTED_JOBS_IN_PROCESS = True
    monkeypatch.setitem(JOBS, TaskKind.EXPERT_AGGREGATION, JobKind("workers.nowhere.missing_task", AggregationParams))
    task = create_training_task(kind=TaskKind.EXPERT_AGGREGATION, actor=world.engineer, round_=world.open_round())
    assert IN_PROCESS.wait_idle(JOBS_TIMEOUT_S)
    failed = TrainingTask.objects.get(pk=task.pk)
    assert failed.status == TaskStatus.FAILED
    assert (
        failed.error
        == "no Celery task named 'workers.nowhere.missing_task' is registered (is the workers package installed?)"
    )


def test_a_process_that_is_done_waits_for_its_jobs(tmp_path: Path) -> None:
    # The ingest worker and runserver end by returning from main: the jobs thread must finish first.
    done = tmp_path / "done"
    script = (
        "import sys, time, django\n"
        "django.setup()\n"
        "from apps.federation.jobs import IN_PROCESS\n"
        "def job():\n"
        "    time.sleep(1.0)\n"
        f"    open({str(done)!r}, 'w').write('finished')\n"
        "IN_PROCESS.submit(job)\n"
        "print('main returns', flush=True)\n"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "controlplane.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "CELERY_BROKER_URL": "",
        "PYTHONPATH": str(django_settings.BASE_DIR),
    }
    completed = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout == "main returns\n"
    assert done.read_text() == "finished"
