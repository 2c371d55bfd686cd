"""Governance services: approval requests and officers' decisions on them — each audited.

Approving moves the `champion` alias and announces ModelAvailable after commit; an officer never decides a request
they made, and only officers decide. Engineers request approval; so does the `system` account
(`apps.accounts.services.system_user`) for versions automated rounds produced, which keeps a person — an officer who
is not the requester — as the one who decides.
"""

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone

from apps.accounts.choices import Role
from apps.accounts.models import User
from apps.accounts.roles import role_of
from apps.federation.choices import TaskKind
from apps.federation.events import publish_model_available_on_commit
from apps.federation.models import TrainingTask
from apps.governance.actors import ActorLike, as_actor
from apps.governance.audit import record_audit_event, redact_for_storage
from apps.governance.choices import ApprovalStatus, Decision
from apps.governance.gate import Breach, GateVerdict, gate_verdict
from apps.governance.models import ApprovalDecision, ApprovalRequest, GateOverride
from apps.registry.choices import CHAMPION_ALIAS, VersionStatus
from apps.registry.models import Alias, ModelVersion
from apps.registry.services import move_alias, set_version_status
from fednested.observability.tracing import resumed_span

REQUESTER_ROLES = frozenset({Role.ENGINEER, Role.ADMIN, Role.SYSTEM})


class PromotionHeld(Exception):  # a refusal, like Django's PermissionDenied, not a program error
    """The promotion gate holds the candidate: the API answers 409 with `verdict`'s breaches, the console says why."""

    def __init__(self, version_id: str, verdict: GateVerdict) -> None:
        self.version_id = version_id
        self.verdict = verdict
        super().__init__(
            f"version {version_id!r} is held by the promotion gate: {verdict.summary()}; a second officer may grant "
            "an override another officer asked for"
        )


@transaction.atomic
def request_approval(version: ModelVersion, *, actor: ActorLike, note: str = "") -> ApprovalRequest:
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
    # Free text is stored redacted of PII (docs/pii-redaction.md); the audit event records what was replaced.
    redacted = redact_for_storage(note, where=f"approval request note of {version.version_id}")
    request = ApprovalRequest.objects.create(version=version, requested_by=_account(actor), note=redacted.text)
    record_audit_event(
        actor=actor,
        verb="governance.approval.requested",
        target=request,
        data={"version_id": version.version_id, "note": redacted.text},
        redacted=redacted.entities,
    )
    return request


def _account(actor: ActorLike) -> User:
    """The account that requests or decides: a person's (or the system account's); only parties with an account
    get past the role checks, so this refuses nobody those checks let through."""
    user = as_actor(actor).user
    if user is None:
        raise PermissionDenied(
            f"{as_actor(actor).label!r} has no account: only people (or the system) request or decide"
        )
    return user


def _check_decider(request: ApprovalRequest, actor: ActorLike) -> None:
    if role_of(actor) != Role.OFFICER:
        raise PermissionDenied("only governance officers decide approval requests")
    if request.requested_by_id == _account(actor).pk:
        raise PermissionDenied("an officer cannot decide their own approval request")


def _decide(
    request: ApprovalRequest, *, actor: ActorLike, decision: str, reason: str, override: GateOverride | None = None
) -> ApprovalRequest:
    _check_decider(request, actor)
    # Claim the request: of two officers deciding at once, exactly one gets here with a count of 1.
    claimed = ApprovalRequest.objects.filter(pk=request.pk, status=ApprovalStatus.PENDING).update(status=decision)
    request.refresh_from_db()
    if claimed != 1:
        raise ValidationError({"status": f"approval request #{request.pk} was already {request.status}"})
    redacted = redact_for_storage(reason, where=f"{decision} reason of approval request #{request.pk}")
    ApprovalDecision.objects.create(
        request=request, decided_by=_account(actor), decision=decision, reason=redacted.text
    )
    record_audit_event(
        actor=actor,
        verb=f"governance.approval.{decision}",
        target=request,
        redacted=redacted.entities,
        data={
            "version_id": request.version.version_id,
            "reason": redacted.text,
            "decided_at": timezone.now().isoformat(),
            **({"gate_override": override.pk, "overridden": override.breaches} if override is not None else {}),
        },
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
def approve_version(request: ApprovalRequest, *, actor: ActorLike, reason: str = "") -> ApprovalRequest:
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


def covering_override(request: ApprovalRequest, breaches: list[Breach]) -> GateOverride | None:
    """The granted override of `request` that covers every one of `breaches`, if any (newest first)."""
    wanted = {breach.key for breach in breaches}
    for override in GateOverride.objects.filter(request=request, granted_at__isnull=False).order_by("-granted_at"):
        granted = {
            (item.get("domain", ""), item.get("against", ""), item.get("reference") or "", item.get("limit", ""))
            for item in override.breaches
            if isinstance(item, dict)
        }
        if wanted <= granted:
            return override
    return None


def _approve(request: ApprovalRequest, *, actor: ActorLike, reason: str) -> ApprovalRequest:
    # The gate is asked inside the approval's transaction, after the version row is locked, so a stale page (or two
    # officers at once) cannot slip a held candidate through.
    # Who may decide is checked first: someone who may not approve at all is told that, not the gate's figures.
    _check_decider(request, actor)
    locked = ModelVersion.objects.select_for_update().filter(pk=request.version_id).first()
    still_pending = ApprovalRequest.objects.filter(pk=request.pk, status=ApprovalStatus.PENDING).exists()
    if still_pending and locked is not None and locked.status != VersionStatus.CANDIDATE:
        # A request left pending on a version since rejected, archived or superseded: approving it would move the
        # champion back to what an officer or a later promotion set aside. (A decided request is refused by _decide.)
        raise ValidationError(
            {"version": f"version {locked.version_id!r} is {locked.status}; only a candidate can be approved"}
        )
    verdict = gate_verdict(request.version)
    override = None
    if verdict.held:
        # A broken thresholds file holds everything: nothing was granted against it.
        override = covering_override(request, verdict.breaches) if not verdict.error else None
        if override is None:
            raise PromotionHeld(request.version.version_id, verdict)
    request = _decide(request, actor=actor, decision=Decision.APPROVED, reason=reason, override=override)
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
def reject_version(request: ApprovalRequest, *, actor: ActorLike, reason: str) -> ApprovalRequest:
    """Reject: the version is marked rejected; `reason` is required so the requester knows what to fix."""
    if not reason.strip():
        raise ValidationError({"reason": "a rejection needs a reason"})
    request = _decide(request, actor=actor, decision=Decision.REJECTED, reason=reason)
    set_version_status(request.version, VersionStatus.REJECTED, actor=actor)
    return request


def _officer_reason(actor: ActorLike, reason: str, what: str) -> str:
    """The reason, stripped; PermissionDenied for anyone but an officer, ValidationError for a blank reason."""
    if role_of(actor) != Role.OFFICER:
        raise PermissionDenied(f"only governance officers {what}")
    if not reason.strip():
        raise ValidationError({"reason": "a gate override needs a written reason (it is recorded in the audit trail)"})
    return reason.strip()


@transaction.atomic
def request_gate_override(request: ApprovalRequest, *, actor: ActorLike, reason: str) -> GateOverride:
    """An officer asks that a candidate the gate holds be approved anyway; another officer must grant it.

    Records the breaches as they stand, so the grant covers exactly what was asked about.
    """
    reason = _officer_reason(actor, reason, "ask for gate overrides")
    request = ApprovalRequest.objects.select_for_update().select_related("version").get(pk=request.pk)
    if request.status != ApprovalStatus.PENDING:
        raise ValidationError({"status": f"approval request #{request.pk} was already {request.status}"})
    verdict = gate_verdict(request.version)
    if verdict.error:
        raise ValidationError({"gate": verdict.summary() + "; fix the thresholds file rather than override it"})
    if not verdict.breaches:
        raise ValidationError({"gate": f"version {request.version.version_id!r} is not held by the gate"})
    if GateOverride.objects.filter(request=request, granted_at__isnull=True).exists():
        raise ValidationError({"gate": f"approval request #{request.pk} already has an override waiting for a grant"})
    redacted = redact_for_storage(reason, where=f"gate override reason of approval request #{request.pk}")
    override = GateOverride.objects.create(
        request=request,
        requested_by=_account(actor),
        reason=redacted.text,
        breaches=[breach.to_json() for breach in verdict.breaches],
    )
    record_audit_event(
        actor=actor,
        verb="governance.gate.override_requested",
        target=request,
        redacted=redacted.entities,
        data={
            "version_id": request.version.version_id,
            "override": override.pk,
            "reason": redacted.text,
            "breaches": override.breaches,
        },
    )
    return override


@transaction.atomic
def grant_gate_override(override: GateOverride, *, actor: ActorLike, reason: str) -> GateOverride:
    """A second officer grants an override: not the officer who asked for it, nor the requester of the approval."""
    reason = _officer_reason(actor, reason, "grant gate overrides")
    if override.requested_by_id == _account(actor).pk:
        raise PermissionDenied("an officer cannot grant the gate override they asked for: a second officer must")
    if override.request.requested_by_id == _account(actor).pk:
        raise PermissionDenied("the requester of the approval cannot grant a gate override of it")
    if override.request.status != ApprovalStatus.PENDING:
        raise ValidationError(
            {"status": f"approval request #{override.request_id} was already {override.request.status}"}
        )
    redacted = redact_for_storage(reason, where=f"grant reason of gate override #{override.pk}")
    # Claim it: of two officers granting at once, exactly one gets a count of 1.
    claimed = GateOverride.objects.filter(pk=override.pk, granted_at__isnull=True).update(
        granted_by=_account(actor), grant_reason=redacted.text, granted_at=timezone.now()
    )
    if claimed != 1:
        raise ValidationError({"gate": f"gate override #{override.pk} was already granted"})
    override.refresh_from_db()
    record_audit_event(
        actor=actor,
        verb="governance.gate.override_granted",
        target=override.request,
        redacted=redacted.entities,
        data={
            "version_id": override.request.version.version_id,
            "override": override.pk,
            "requested_by": override.requested_by.get_username(),
            "reason": redacted.text,
            "breaches": override.breaches,
        },
    )
    return override
