"""GET /api/v1/schedules/: the periodic tasks with their schedule in words, params and last outcome, for officers
and engineers; the schema describes it."""

from collections.abc import Callable
from typing import Any

import pytest
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, PeriodicTask

from apps.schedules.choices import OutcomeStatus
from apps.schedules.services import EVALUATE_CHAMPION_TASK, START_CORE_UPDATE_TASK, record_outcome

pytestmark = pytest.mark.django_db


def test_engineers_and_officers_read_each_schedule_with_its_params_and_last_outcome(
    cast: dict[str, Any], every_second: Callable[..., PeriodicTask]
) -> None:
    PeriodicTask.objects.all().delete()
    every_second("core-update-hourly", START_CORE_UPDATE_TASK, max_steps=3)
    nightly = CrontabSchedule.objects.create(minute="0", hour="3", timezone="UTC")
    PeriodicTask.objects.create(name="champion-nightly", task=EVALUATE_CHAMPION_TASK, crontab=nightly, enabled=False)
    when = timezone.now()
    record_outcome("core-update-hourly", status=OutcomeStatus.ERROR, detail="no core_update task created: x", now=when)
    for member in ("engineer", "officer"):
        response = cast[member].client.get("/api/v1/schedules/")
        assert response.status_code == 200, response.content
        body = response.json()
        rows = {row["name"]: row for row in (body["results"] if isinstance(body, dict) else body)}
        assert set(rows) == {"core-update-hourly", "champion-nightly"}
        hourly, champion = rows["core-update-hourly"], rows["champion-nightly"]
        assert (hourly["task"], hourly["schedule"], hourly["enabled"], hourly["params"]) == (
            START_CORE_UPDATE_TASK,
            "every second",
            True,
            {"max_steps": 3},
        )
        assert hourly["outcome"]["status"] == "error"
        assert hourly["outcome"]["detail"] == "no core_update task created: x"
        assert hourly["outcome"]["consecutive_errors"] == 1
        assert (champion["schedule"], champion["enabled"], champion["outcome"]) == ("At 03:00 AM UTC", False, None)
    assert cast["device"].client.get("/api/v1/schedules/").status_code == 403
    assert cast["outsider"].client.get("/api/v1/schedules/").status_code == 403
    assert cast["anonymous"].client.get("/api/v1/schedules/").status_code == 401
    # Read-only: schedules are edited in the admin.
    assert cast["engineer"].client.post("/api/v1/schedules/", {"name": "x"}, format="json").status_code == 405


def test_the_schema_publishes_the_schedules_routes(client: Any) -> None:
    schema = client.get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    assert set(schema["paths"]["/api/v1/schedules/"]) == {"get"}
    assert set(schema["paths"]["/api/v1/schedules/{id}/"]) == {"get"}
    properties = schema["components"]["schemas"]["Schedule"]["properties"]
    assert {"name", "task", "schedule", "enabled", "params", "last_run_at", "outcome"} <= set(properties)


def test_the_admin_edits_schedules_and_shows_their_outcomes(
    cast: dict[str, Any], client: Any, every_second: Callable[..., PeriodicTask]
) -> None:
    schedule = every_second("core-update-hourly", START_CORE_UPDATE_TASK, bogus=1)
    record_outcome(
        schedule.name, status=OutcomeStatus.ERROR, detail="no core_update task created: y", now=timezone.now()
    )
    root = cast["officer"].user
    root.is_staff = root.is_superuser = True
    root.save()
    client.force_login(root)
    edit = client.get(f"/admin/django_celery_beat/periodictask/{schedule.pk}/change/")
    assert edit.status_code == 200
    assert b"core-update-hourly" in edit.content
    outcomes = client.get("/admin/schedules/scheduleoutcome/")
    assert outcomes.status_code == 200
    assert b"no core_update task created: y" in outcomes.content
    assert client.get("/admin/schedules/scheduleoutcome/add/").status_code == 403
