"""Settings helpers, system checks, migrations, Celery queues, ASGI routing and the served OpenAPI docs."""

import os
import re
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command

from controlplane.settings import database_from_url, envbool, envint, envlist, envstr


def test_envstr_reads_secret_from_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t\n", encoding="utf-8")
    monkeypatch.setenv("FN_TEST_SECRET", "from-env")
    monkeypatch.setenv("FN_TEST_SECRET_FILE", str(secret))
    assert envstr("FN_TEST_SECRET", "default") == "s3cr3t"


def test_envstr_file_that_cannot_be_read_names_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FN_TEST_SECRET_FILE", str(tmp_path / "missing"))
    with pytest.raises(ImproperlyConfigured, match="FN_TEST_SECRET_FILE"):
        envstr("FN_TEST_SECRET", "")


@pytest.mark.parametrize(
    ("raw", "expected"), [("1", True), ("yes", True), ("False", False), ("off", False), ("", True)]
)
def test_envbool_words(monkeypatch: pytest.MonkeyPatch, raw: str, expected: bool) -> None:
    monkeypatch.setenv("FN_TEST_FLAG", raw)
    assert envbool("FN_TEST_FLAG", True) is expected


def test_envbool_and_envint_reject_garbage_with_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FN_TEST_FLAG", "maybe")
    monkeypatch.setenv("FN_TEST_INT", "12x")
    with pytest.raises(ImproperlyConfigured, match="FN_TEST_FLAG='maybe'"):
        envbool("FN_TEST_FLAG", False)
    with pytest.raises(ImproperlyConfigured, match="FN_TEST_INT='12x'"):
        envint("FN_TEST_INT", 3)


def test_envint_and_envlist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FN_TEST_INT", " 42 ")
    monkeypatch.setenv("FN_TEST_LIST", "a.example, b.example,,")
    assert envint("FN_TEST_INT", 1) == 42
    assert envint("FN_TEST_UNSET_INT", 7) == 7
    assert envlist("FN_TEST_LIST", "") == ["a.example", "b.example"]


def test_database_from_url_postgres() -> None:
    config = database_from_url("postgres://fed:p%40ss@db.internal:5433/fednested?sslmode=require")
    assert config["ENGINE"] == "django.db.backends.postgresql"
    assert (config["NAME"], config["USER"], config["PASSWORD"]) == ("fednested", "fed", "p@ss")
    assert (config["HOST"], config["PORT"]) == ("db.internal", "5433")
    assert config["OPTIONS"] == {"sslmode": "require"}


def test_database_from_url_sqlite_and_errors() -> None:
    sqlite = database_from_url("sqlite:///var/db.sqlite3")
    assert (sqlite["ENGINE"], sqlite["NAME"]) == ("django.db.backends.sqlite3", "var/db.sqlite3")
    # Several processes write the embedded mode's file: the write lock is taken up front, waits are long.
    assert sqlite["OPTIONS"]["transaction_mode"] == "IMMEDIATE"
    assert sqlite["OPTIONS"]["timeout"] == 60.0
    assert "journal_mode=WAL" in sqlite["OPTIONS"]["init_command"]
    assert database_from_url("sqlite:////tmp/x.sqlite3")["NAME"] == "/tmp/x.sqlite3"
    assert database_from_url("sqlite://:memory:")["NAME"] == ":memory:"
    with pytest.raises(ImproperlyConfigured, match="names no database"):
        database_from_url("postgres://u@h:5432/")
    with pytest.raises(ImproperlyConfigured, match="'mysql' is not supported"):
        database_from_url("mysql://u@h/db")


def test_system_checks_are_clean_at_warning_level() -> None:
    call_command("check", fail_level="WARNING", stdout=StringIO())


@pytest.mark.django_db
def test_migrations_match_models() -> None:
    # Exits non-zero (SystemExit) when a model change has no migration.
    call_command("makemigrations", check=True, dry_run=True, stdout=StringIO())


def test_celery_has_one_queue_per_job_kind_and_routes_worker_modules() -> None:
    from apps.federation.jobs import JOBS
    from controlplane.celery import app

    assert {queue.name for queue in app.conf.task_queues} == {"aggregation", "evaluation", "schedules", "training"}
    router = app.amqp.router
    # Every job is sent by name alone (apps/federation/jobs.py): the route puts it in the queue of its module.
    routes = {kind: router.route({}, job.task_name, args=(1,), kwargs={})["queue"].name for kind, job in JOBS.items()}
    assert routes == {"core_update": "training", "expert_aggregation": "aggregation", "evaluation": "evaluation"}
    # The outer loop's periodic tasks (apps/schedules/services.py), sent by beat by name alone too.
    from apps.schedules.services import SCHEDULED_TASKS

    assert {router.route({}, name, args=(), kwargs={})["queue"].name for name in SCHEDULED_TASKS} == {"schedules"}


def test_asgi_routes_http_and_websocket() -> None:
    from opentelemetry.instrumentation.django import DjangoInstrumentor

    instrumented = DjangoInstrumentor().is_instrumented_by_opentelemetry
    from controlplane.asgi import application

    assert set(application.application_mapping) == {"http", "websocket"}
    if not instrumented:
        # Importing the ASGI module instruments Django for the whole process; later tests expect it as it was.
        DjangoInstrumentor().uninstrument()


@pytest.mark.django_db
def test_openapi_schema_and_swagger_ui_are_served_to_anonymous_without_a_cdn(client: object) -> None:
    from django.test import Client

    assert isinstance(client, Client)
    schema = client.get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for expected in (
        "/api/v1/versions/",
        "/api/v1/enroll/",
        "/api/v1/approvals/{id}/approve/",
        "/api/v1/audit-events/",
        "/api/v1/versions/{version_id}/files/{file_name}/",
        "/api/v1/versions/{version_id}/evaluations/",
        "/api/v1/updates/{update_id}/payload/",
        "/api/v1/devices/{client_id}/heartbeat/",
    ):
        assert expected in paths
    docs = client.get("/api/v1/docs/")
    assert docs.status_code == 200
    html = docs.content.decode()
    assert "drf_spectacular_sidecar" in html
    assert "cdn" not in html.lower()


REPO = Path(__file__).resolve().parents[2]


def settings_in_a_fresh_process(expression: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Evaluate `expression` on controlplane.settings imported under `env` (settings are read once, at import)."""
    return subprocess.run(
        [sys.executable, "-c", f"import controlplane.settings as s; print({expression})"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_test_database_name_and_upload_limit_come_from_the_environment() -> None:
    result = settings_in_a_fresh_process(
        "s.DATABASES['default'].get('TEST'), s.FEDNESTED_MAX_UPDATE_BYTES",
        FEDNESTED_TEST_DB_NAME="test_fednested_alice",
        FEDNESTED_MAX_UPDATE_BYTES="4096",
    )
    assert result.stdout.strip() == "{'NAME': 'test_fednested_alice'} 4096", result.stderr[-2000:]
    refused = settings_in_a_fresh_process("1", FEDNESTED_MAX_UPDATE_BYTES="0")
    assert refused.returncode != 0
    assert "FEDNESTED_MAX_UPDATE_BYTES=0 must be > 0" in refused.stderr


def test_every_environment_variable_the_settings_read_is_documented() -> None:
    source = (REPO / "controlplane" / "settings.py").read_text(encoding="utf-8")
    read = set(re.findall(r"\benv(?:str|bool|int|list)\(\s*\"([A-Z0-9_]+)\"", source))
    assert {"DATABASE_URL", "FEDNESTED_ARTIFACT_ROOT", "FEDNESTED_TEST_DB_NAME"} <= read
    documented = (REPO / "docs" / "operations" / "settings.md").read_text(encoding="utf-8")
    missing = sorted(name for name in read if f"`{name}`" not in documented)
    assert missing == [], f"docs/operations/settings.md does not describe {missing}"
