"""The REST API keeps its published contract: Schemathesis generates requests from the live OpenAPI schema
(/api/v1/schema/) and sends them, with a token of each role, to the control plane on the real services (pytest-django's
live server on PostgreSQL). Every answer must be no server error and match the schema: a documented status code, a
documented content type, and a body that validates against the schema of that status.

Detail routes get the ids of real rows (a family, versions with their files in the artifact store, a round, a task, an
update, an approval, …) as often as generated ones, so successful answers are checked too, not only 404s.

Bounded: MAX_EXAMPLES cases per operation and role, derandomized (the same cases on every run), no shrinking (a
failing case is reported as generated); pytest-timeout bounds the file's wall-clock time.
"""

import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
import schemathesis
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis.errors import FailureGroup

from apps.accounts.choices import Role
from apps.dataengine.services import Arrival, fire_trigger, record_telemetry, save_rule
from apps.federation.choices import TaskKind
from apps.federation.models import TrainingTask
from apps.federation.services import issue_enrollment_token, open_round
from apps.governance.actors import Actor
from apps.governance.models import AuditEvent
from apps.governance.services import request_approval
from apps.registry.models import ModelVersion
from apps.registry.services import DomainEvaluation, create_model_family, move_alias, record_version_evaluation
from apps.schedules.services import CLOSE_DUE_WINDOWS_TASK
from fednested.messaging import TelemetryV2, encode
from tests.conftest import Member, make_device, make_update_row, make_user
from tests.contract.conftest import CHECKS, CONFIG

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(170)]

# Cases per operation and role: about 40 operations x 4 roles x 10 cases, about 1600 requests in about a minute.
MAX_EXAMPLES = 10
# The device goes first: engineers and admins may revoke it (whose tokens are revoked with it), and officers may
# decide the approval request everyone else then finds decided.
ROLES = ("device", "officer", "engineer", "admin")


@dataclass
class RoleReport:
    operations: int = 0
    cases: int = 0
    failures: list[str] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)


def build_world(
    cast: dict[str, Member], stored_version: Callable[..., ModelVersion]
) -> dict[str, dict[str, list[Any]]]:
    """Real rows for every detail route; returns collection → path parameter → the real values to try."""
    engineer = cast["engineer"].user
    device = cast["device"].device
    assert device is not None
    other_device, _ = make_device(engineer, "car-0002")
    family = create_model_family(
        name="tiny-moe", architecture="MixtralForCausalLM", config={"num_local_experts": 2}, actor=engineer
    )
    v1 = stored_version(family, "v1")
    v2 = stored_version(family, "v2", parent=v1)
    move_alias(name="champion", version=v1, actor=engineer)
    move_alias(name="candidate", version=v2, actor=engineer)
    record_version_evaluation(
        v2,
        [DomainEvaluation(domain="automotive", loss=1.5, perplexity=4.48, tokens=512, records=8, parent_loss=1.75)],
        actor=Actor.automation("tests"),
    )
    window = open_round(
        base_version=v1, buffer_size_k=2, deadline_at=timezone.now() + timedelta(hours=1), actor=engineer
    )
    update = make_update_row(device, "v1", round_=window)
    other_update = make_update_row(other_device, "v1", status="rejected", code="bad_signature", message="tests")
    # The row as create_training_task records it, without handing it to a worker: no job runs during this test.
    task = TrainingTask.objects.create(kind=TaskKind.EXPERT_AGGREGATION, round=window, created_by=engineer)
    approval = request_approval(v2, actor=engineer, note="contract test")
    token, _ = issue_enrollment_token(actor=engineer, note="contract test")
    audit_event = AuditEvent.objects.order_by("id").first()
    assert audit_event is not None
    every_hour, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.HOURS)
    schedule = PeriodicTask.objects.create(name="contract-deadlines", task=CLOSE_DUE_WINDOWS_TASK, interval=every_hour)
    rule = save_rule(actor=engineer, name="v1-rising", kind="rising_loss", task_kind="evaluation")
    report = TelemetryV2.model_validate(
        {
            "client_id": device.client_id,
            "base_version": "v1",
            "loss": 1.5,
            "steps": 1,
            "tokens": 64,
            "duration_s": 1.0,
            "outcome": "succeeded",
            "started_at": timezone.now(),
            "finished_at": timezone.now(),
        }
    )
    [signal_id] = record_telemetry(
        Arrival(where="telemetry.edge[0]@0", key="car", raw=encode(report), event=report)
    ).signal_ids
    trigger = fire_trigger(rule, device.domain, {"signal_ids": [signal_id]})
    return {
        "data-engine/signals": {"id": [signal_id]},
        "data-engine/rules": {"id": [rule.pk]},
        "data-engine/triggers": {"id": [trigger.pk]},
        "devices": {"client_id": [device.client_id, other_device.client_id]},
        "versions": {
            "version_id": ["v1", "v2"],
            "file_name": ["core.safetensors", "experts/layer0_expert1.safetensors", "manifest.json"],
        },
        "families": {"name": ["tiny-moe"]},
        "aliases": {"name": ["champion", "candidate"]},
        "rounds": {"round_id": [window.round_id]},
        "tasks": {"id": [task.pk]},
        "updates": {"update_id": [update.update_id, other_update.update_id]},
        "approvals": {"id": [approval.pk]},
        "enrollment-tokens": {"id": [token.pk]},
        "audit-events": {"id": [audit_event.pk]},
        "schedules": {"id": [schedule.pk]},
    }


def real_path_parameters(operation: Any, world: dict[str, dict[str, list[Any]]]) -> list[dict[str, Any]]:
    """Every combination of real values for the operation's path parameters (none for routes without any)."""
    names = [parameter.name for parameter in operation.path_parameters]
    if not names:
        return []
    # The path below /api/v1/ up to its first parameter: "versions", "data-engine/rules".
    segments = operation.path.split("/")[3:]
    collection = "/".join(itertools.takewhile(lambda segment: not segment.startswith("{"), segments)).strip("/")
    values = [world[collection][name] for name in names]
    return [dict(zip(names, combination, strict=True)) for combination in itertools.product(*values)]


def strategy_for(operation: Any, world: dict[str, dict[str, list[Any]]]) -> Any:
    """Generated cases, and (as often) cases on real rows: the same generation with real path parameters."""
    generated = operation.as_strategy()
    real = real_path_parameters(operation, world)
    if not real:
        return generated
    on_real_rows = st.sampled_from(real).flatmap(lambda parameters: operation.as_strategy(path_parameters=parameters))
    return st.one_of(generated, on_real_rows)


def sender(role: str, token: str, report: RoleReport, base_url: str) -> Callable[[Any], None]:
    """Sends a case as `role` and checks the answer, recording failures instead of raising (no shrinking)."""
    headers = {"Authorization": f"Token {token}"}

    def send(case: Any) -> None:
        report.cases += 1
        label = f"{role}: {case.method} {case.formatted_path}"
        try:
            # No keep-alive session: Django's test server answers a reused connection ~50 ms later.
            response = case.call(base_url=base_url, headers=headers)
        except OSError as error:  # requests' RequestException: the server did not answer
            report.failures.append(f"{label}: no answer: {error}")
            return
        report.statuses[f"{response.status_code // 100}xx"] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except FailureGroup as group:
            report.failures.append(f"{label}: {str(group)[:3000]}")

    return send


def exercise(strategy: Any, send: Callable[[Any], None]) -> None:
    @hypothesis_settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        send(case)

    run()


def test_every_operation_keeps_the_published_contract_for_every_role(
    live_server: Any, cast: dict[str, Member], stored_version_factory: Callable[..., ModelVersion]
) -> None:
    started = time.monotonic()
    world = build_world(cast, stored_version_factory)
    _, admin_token = make_user("ada-admin", Role.ADMIN)
    tokens = {name: cast[name].token for name in ("device", "officer", "engineer")} | {"admin": admin_token}

    schema = schemathesis.openapi.from_url(f"{live_server.url}/api/v1/schema/?format=json", config=CONFIG)
    operations = [result.ok() for result in schema.get_all_operations()]
    reports = {role: RoleReport() for role in ROLES}
    for role in ROLES:
        send = sender(role, tokens[role], reports[role], live_server.url)
        for operation in operations:
            reports[role].operations += 1
            exercise(strategy_for(operation, world), send)

    elapsed = time.monotonic() - started
    lines = [f"{'role':<10}{'operations':>12}{'cases':>8}{'2xx':>7}{'4xx':>7}{'5xx':>7}{'failures':>10}"]
    for role, report in reports.items():
        lines.append(
            f"{role:<10}{report.operations:>12}{report.cases:>8}{report.statuses['2xx']:>7}"
            f"{report.statuses['4xx']:>7}{report.statuses['5xx']:>7}{len(report.failures):>10}"
        )
    print(f"\nAPI contract (Schemathesis, max_examples={MAX_EXAMPLES} per operation and role, {elapsed:.0f} s):")
    print("\n".join(lines))
    failures = [failure for report in reports.values() for failure in report.failures]
    assert not failures, f"{len(failures)} answers broke the contract:\n\n" + "\n\n".join(failures[:15])
    # The run reached the handlers, not only the refusals: every role got successful answers.
    assert all(report.statuses["2xx"] > 0 for report in reports.values())
