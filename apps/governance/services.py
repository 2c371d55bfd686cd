"""Governance services: approval requests and officers' decisions on them — each audited.

Approving moves the `champion` alias and announces ModelAvailable after commit; an officer never decides a request
they made, and only officers decide. Engineers request approval; so does the `system` account
(`apps.accounts.services.system_user`) for versions automated rounds produced, which keeps a person — an officer who
is not the requester — as the one who decides.
"""

from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone

from apps.accounts.choices import Role
from apps.accounts.roles import role_of
from apps.federation.choices import TaskKind
from apps.federation.events import publish_model_available_on_commit
from apps.federation.models import TrainingTask
from apps.governance.audit import record_audit_event
from apps.governance.choices import ApprovalStatus, Decision
from apps.governance.models import ApprovalDecision, ApprovalRequest
from apps.registry.choices import CHAMPION_ALIAS, VersionStatus
from apps.registry.models import Alias, ModelVersion
from apps.registry.services import move_alias, set_version_status
from fednested.observability.tracing import resumed_span

REQUESTER_ROLES = frozenset({Role.ENGINEER, Role.ADMIN, Role.SYSTEM})


@transaction.atomic
def request_approval(version: ModelVersion, *, actor: Any, note: str = "") -> ApprovalRequest:
    """Ask officers to approve candidate `version` for promotion; one open request per version."""
    if role_of(actor) not in REQUESTER_ROLES:
        raise PermissionDenied("only engineers (or admins, or the system account) request approval of a version")
    version = ModelVersion.objects.select_for_update().get(pk=version.pk)
    if version.status != VersionStatus.CANDIDATE:
        raise ValidationError(
            {"version": f"version {version.version_id!r} is {version.status}; only candidates can be approved"}
        )
    if ApprovalRequest.objects.filter(version=version, status=ApprovalStatus.PENDING).exists():
        raise ValidationError({"version": f"version {version.version_id!r} already has a pending approval request"})
    request = ApprovalRequest.objects.create(version=version, requested_by=actor, note=note)
    record_audit_event(
        actor=actor,
        verb="governance.approval.requested",
        target=request,
        data={"version_id": version.version_id, "note": note},
    )
    return request


def _decide(request: ApprovalRequest, *, actor: Any, decision: str, reason: str) -> ApprovalRequest:
    if role_of(actor) != Role.OFFICER:
        raise PermissionDenied("only governance officers decide approval requests")
    if request.requested_by_id == actor.pk:
        raise PermissionDenied("an officer cannot decide their own approval request")
    # Claim the request: of two officers deciding at once, exactly one gets here with a count of 1.
    claimed = ApprovalRequest.objects.filter(pk=request.pk, status=ApprovalStatus.PENDING).update(status=decision)
    request.refresh_from_db()
    if claimed != 1:
        raise ValidationError({"status": f"approval request #{request.pk} was already {request.status}"})
    ApprovalDecision.objects.create(request=request, decided_by=actor, decision=decision, reason=reason)
    record_audit_event(
        actor=actor,
        verb=f"governance.approval.{decision}",
        target=request,
        data={"version_id": request.version.version_id, "reason": reason, "decided_at": timezone.now().isoformat()},
    )
    return request


def candidate_traceparent(version: ModelVersion) -> str:
    """The trace that produced `version`: its evaluation task was created inside the aggregation's span; "" when
    no task of the federation made it (a version registered by hand)."""
    created_by = (
        TrainingTask.objects.filter(round__candidate=version, kind=TaskKind.EVALUATION)
        .exclude(traceparent="")
        .order_by("-created_at", "-id")
        .values_list("traceparent", flat=True)
        .first()
    )
    return created_by or ""


@transaction.atomic
def approve_version(request: ApprovalRequest, *, actor: Any, reason: str = "") -> ApprovalRequest:
    """Approve: the version becomes champion (alias moved, previous champion archived); ModelAvailable after commit.

    Traced as a span of the trace that produced the candidate (linked to the officer's request), so one trace runs
    from a device's upload to the approval of the version its update went into.
    """
    version = request.version
    with resumed_span(
        "approve_version",
        traceparent=candidate_traceparent(version),
        attributes={"fednested.version_id": version.version_id, "fednested.approval_request": request.pk},
    ):
        return _approve(request, actor=actor, reason=reason)


def _approve(request: ApprovalRequest, *, actor: Any, reason: str) -> ApprovalRequest:
    request = _decide(request, actor=actor, decision=Decision.APPROVED, reason=reason)
    version = request.version
    previous = Alias.objects.select_for_update().filter(name=CHAMPION_ALIAS).select_related("version").first()
    if previous is not None and previous.version_id != version.pk:
        set_version_status(previous.version, VersionStatus.ARCHIVED, actor=actor)
    set_version_status(version, VersionStatus.CHAMPION, actor=actor)
    move_alias(name=CHAMPION_ALIAS, version=version, actor=actor)
    publish_model_available_on_commit(
        version_id=version.version_id,
        alias=CHAMPION_ALIAS,
        manifest_sha256=version.manifest_sha256,
        artifact_uri=version.artifact_uri,
    )
    return request


@transaction.atomic
def reject_version(request: ApprovalRequest, *, actor: Any, reason: str) -> ApprovalRequest:
    """Reject: the version is marked rejected; `reason` is required so the requester knows what to fix."""
    if not reason.strip():
        raise ValidationError({"reason": "a rejection needs a reason"})
    request = _decide(request, actor=actor, decision=Decision.REJECTED, reason=reason)
    set_version_status(request.version, VersionStatus.REJECTED, actor=actor)
    return request
