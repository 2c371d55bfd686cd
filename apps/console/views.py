"""Console pages. Reads come straight from the apps' models; every write goes through a governance service."""

from collections.abc import Iterable
from typing import Any

from django.contrib import messages
from django.contrib.auth.views import LoginView, LogoutView
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Page, Paginator
from django.db.models import Count, Prefetch, Q
from django.http import HttpRequest, HttpResponse, HttpResponseBase, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.views.decorators.http import require_POST

from apps.accounts.choices import Role
from apps.accounts.refusals import csrf_failure as audited_csrf_failure
from apps.accounts.roles import role_of
from apps.console.access import AUDIT_READER_ROLES, console_page, forbidden, render_page
from apps.console.evaluation import evaluation_summary, forgetting_view
from apps.console.evidence import config_diff, contributions, lineage_chart, policy_decisions
from apps.console.forms import AuditFilterForm, DecisionForm, OverrideForm, UpdateFilterForm
from apps.federation.choices import UpdateStatus
from apps.federation.models import EdgeDevice, Round, Update
from apps.governance.actors import Actor
from apps.governance.choices import ApprovalStatus
from apps.governance.export import audit_export_response
from apps.governance.gate import GateVerdict, gate_verdict
from apps.governance.mlflow_sync import mlflow_links
from apps.governance.models import ApprovalRequest, AuditEvent, GateOverride
from apps.governance.services import (
    PromotionHeld,
    approve_version,
    covering_override,
    grant_gate_override,
    reject_version,
    request_gate_override,
)
from apps.registry.choices import CHAMPION_ALIAS, LineageKind
from apps.registry.evidence import aggregation_evidence
from apps.registry.models import Alias, LineageEdge, ModelVersion

PAGE_SIZE = 50
DASHBOARD_ROWS = 15


class SignInView(LoginView):
    """Username and password sign-in; the session then authenticates every console page (and the browsable API)."""

    template_name = "console/sign_in.html"
    redirect_authenticated_user = True

    def get_default_redirect_url(self) -> str:
        return reverse("console:dashboard")


class SignOutView(LogoutView):
    """Sign out (POST only, so a link on another site cannot sign anyone out)."""

    def get_default_redirect_url(self) -> str:
        return reverse("console:sign-in")


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """CSRF_FAILURE_VIEW: a form posted without this session's token (forged on another site, or a page kept open
    across a sign-out) is recorded as a refused access (apps.accounts.refusals) and answered in the console's layout
    with what to do, rather than Django's bare page."""
    audited_csrf_failure(request, reason)  # records the refusal; the console's page below replaces Django's
    return forbidden(
        request,
        f"Refused: the form was not sent from a console page of your current session (CSRF verification failed: "
        f"{reason}). Nothing was changed; reload the page and submit it again.",
        back_url=reverse("console:dashboard"),
    )


def _page(request: HttpRequest, rows: Any) -> Page[Any]:
    return Paginator(rows, PAGE_SIZE).get_page(request.GET.get("page"))


def _query_without_page(request: HttpRequest) -> str:
    query = request.GET.copy()
    query.pop("page", None)
    return query.urlencode()


def _may_decide(user: Any, approval: ApprovalRequest) -> bool:
    """Mirrors governance.services' rule for showing the buttons; the service itself still decides on POST."""
    return (
        approval.status == ApprovalStatus.PENDING
        and role_of(user) == Role.OFFICER
        and approval.requested_by_id != user.pk
    )


def _why_not_decide(user: Any, approval: ApprovalRequest) -> str:
    if approval.status != ApprovalStatus.PENDING:
        return ""
    if approval.requested_by_id == user.pk:
        return "You requested this approval, so another officer must decide it."
    if role_of(user) != Role.OFFICER:
        return "Only governance officers decide approval requests."
    return ""


def _gate_context(user: Any, pending: ApprovalRequest | None) -> dict[str, Any]:
    """The promotion gate on the version page: whether it blocks Approve, and who may ask for or grant an override.

    Mirrors governance.services' rules for showing the controls; the services decide again on POST.
    """
    if pending is None:
        return {"gate": None}
    verdict: GateVerdict = gate_verdict(pending.version)
    granted = covering_override(pending, verdict.breaches) if verdict.held and not verdict.error else None
    open_override = GateOverride.objects.filter(request=pending, granted_at=None).select_related("requested_by").first()
    is_officer = role_of(user) == Role.OFFICER and pending.requested_by_id != user.pk
    why_not_grant = ""
    if open_override is not None and open_override.requested_by_id == user.pk:
        why_not_grant = "You asked for this override, so a second officer must grant it."
    return {
        "gate": verdict,
        "gate_blocks": verdict.held and granted is None,
        "granted_override": granted,
        "open_override": open_override,
        "may_request_override": is_officer
        and verdict.held
        and not verdict.error
        and granted is None
        and open_override is None,
        "may_grant_override": is_officer and open_override is not None and open_override.requested_by_id != user.pk,
        "why_not_grant": why_not_grant,
    }


@console_page()
def dashboard(request: HttpRequest) -> HttpResponse:
    versions = (
        ModelVersion.objects.select_related("family", "parent")
        .prefetch_related(Prefetch("aliases", queryset=Alias.objects.order_by("name")))
        .annotate(applied_count=Count("applied_updates"))
        .order_by("-created_at", "-id")[:DASHBOARD_ROWS]
    )
    devices = EdgeDevice.objects.select_related("current_version").order_by("client_id")
    updates = Update.objects.select_related("device", "base_version", "applied_in").order_by("-received_at", "-id")[
        :DASHBOARD_ROWS
    ]
    pending = (
        ApprovalRequest.objects.filter(status=ApprovalStatus.PENDING)
        .select_related("version", "requested_by")
        .order_by("created_at")
    )
    champion = Alias.objects.filter(name=CHAMPION_ALIAS).select_related("version").first()
    rounds = (
        Round.objects.select_related("base_version", "candidate")
        .annotate(update_count=Count("updates"))
        .order_by("-opened_at", "-id")[:5]
    )
    counts = Update.objects.aggregate(total=Count("id"), rejected=Count("id", filter=Q(status=UpdateStatus.REJECTED)))
    return render_page(
        request,
        "console/dashboard.html",
        {
            "versions": versions,
            "devices": devices,
            "updates": updates,
            "pending": pending,
            "champion": champion.version if champion else None,
            "rounds": rounds,
            "update_counts": counts,
        },
        nav="dashboard",
    )


@console_page()
def decision_queue(request: HttpRequest) -> HttpResponse:
    """What waits for an officer, oldest first: approval requests to decide and gate overrides to grant."""
    approvals = (
        ApprovalRequest.objects.filter(status=ApprovalStatus.PENDING)
        .select_related("version", "requested_by")
        .order_by("created_at", "id")
    )
    overrides = (
        GateOverride.objects.filter(granted_at=None, request__status=ApprovalStatus.PENDING)
        .select_related("request__version", "requested_by")
        .order_by("requested_at", "id")
    )
    return render_page(request, "console/queue.html", {"approvals": approvals, "overrides": overrides}, nav="queue")


def _manifest_summary(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """The manifest facts an officer reads; the full JSON stays available through the API."""
    architecture = manifest.get("architecture")
    config: dict[str, Any] = {}
    facts: list[tuple[str, str]] = []
    if isinstance(architecture, dict):
        config = architecture.get("config") if isinstance(architecture.get("config"), dict) else {}  # type: ignore[assignment]
        family = architecture.get("family") or architecture.get("model_type")
        if family:
            facts.append(("Architecture", str(family)))
    elif architecture:
        facts.append(("Architecture", str(architecture)))
    for label, keys in (
        ("Layers", ("num_hidden_layers", "n_layer")),
        ("Experts per layer", ("num_local_experts", "num_experts")),
        ("Experts per token", ("num_experts_per_tok", "top_k")),
        ("Hidden size", ("hidden_size", "d_model")),
        ("Vocabulary", ("vocab_size",)),
    ):
        for key in keys:
            if key in config:
                facts.append((label, str(config[key])))
                break
    for label, key in (("Manifest format", "format_version"), ("Created (manifest)", "created_at")):
        if manifest.get(key) is not None:
            facts.append((label, str(manifest[key])))
    return facts


def _lineage(version: ModelVersion) -> dict[str, Any]:
    edges = list(LineageEdge.objects.filter(version=version).order_by("kind", "source_ref"))
    update_refs = [edge.source_ref for edge in edges if edge.kind == LineageKind.UPDATE]
    known = {
        update.update_id: update
        for update in Update.objects.filter(Q(update_id__in=update_refs) | Q(applied_in=version)).select_related(
            "device", "base_version"
        )
    }
    contributing = [(ref, known.get(ref)) for ref in update_refs]
    # Updates marked applied in this version but missing from its lineage edges would be a bookkeeping bug:
    # show them too, so an officer sees everything that went in.
    contributing += [(ref, update) for ref, update in known.items() if ref not in update_refs]
    return {
        "contributing": contributing,
        "datasets": [edge.source_ref for edge in edges if edge.kind == LineageKind.DATASET],
        "runs": [edge.source_ref for edge in edges if edge.kind == LineageKind.RUN],
        "children": list(version.children.order_by("created_at")),
    }


def _version_page(
    request: HttpRequest,
    version: ModelVersion,
    *,
    form: DecisionForm | None = None,
    override_form: OverrideForm | None = None,
    status: int = 200,
) -> HttpResponse:
    approvals = list(
        ApprovalRequest.objects.filter(version=version)
        .select_related("requested_by", "decision", "decision__decided_by")
        .order_by("-created_at")
    )
    pending = next((a for a in approvals if a.status == ApprovalStatus.PENDING), None)
    artifacts = list(version.artifacts.all())
    evaluation = evaluation_summary(version)
    lineage = _lineage(version)
    return render_page(
        request,
        "console/version_detail.html",
        {
            "version": version,
            "aliases": [alias.name for alias in version.aliases.order_by("name")],
            "manifest_facts": _manifest_summary(version.manifest),
            "artifacts": artifacts,
            "artifact_bytes": sum(a.size_bytes for a in artifacts),
            "lineage": lineage,
            "contributions": contributions(version, [ref for ref, _ in lineage["contributing"]]),
            "lineage_chart": lineage_chart(version),
            "policy_decisions": policy_decisions(version),
            "config_diff": config_diff(version),
            "aggregation": aggregation_evidence(version.manifest),
            "evaluation": evaluation,
            "approvals": approvals,
            "pending": pending,
            "may_decide": pending is not None and _may_decide(request.user, pending),
            "why_not_decide": _why_not_decide(request.user, pending) if pending else "",
            "form": form or DecisionForm(),
            "override_form": override_form or OverrideForm(),
            "forgetting": forgetting_view(version),
            "mlflow": mlflow_links(version),
            **_gate_context(request.user, pending),
        },
        nav="dashboard",
        status=status,
    )


@console_page()
def version_detail(request: HttpRequest, version_id: str) -> HttpResponse:
    version = get_object_or_404(ModelVersion.objects.select_related("family", "parent"), version_id=version_id)
    return _version_page(request, version)


def _validation_text(exc: ValidationError) -> str:
    parts: Iterable[str]
    if hasattr(exc, "message_dict"):
        parts = (f"{field}: {'; '.join(msgs)}" for field, msgs in exc.message_dict.items())
    else:
        parts = exc.messages
    return " ".join(parts)


@require_POST
@console_page()
def decide_approval(request: HttpRequest, request_pk: int) -> HttpResponse:
    """An officer's approve/reject. The governance service enforces who may decide; this view reports its answer."""
    approval = get_object_or_404(ApprovalRequest.objects.select_related("version"), pk=request_pk)
    version_url = reverse("console:version-detail", args=[approval.version.version_id])
    form = DecisionForm(request.POST)
    if not form.is_valid():
        return _version_page(request, approval.version, form=form, status=400)
    decision, reason = form.cleaned_data["decision"], form.cleaned_data["reason"]
    decide = approve_version if decision == "approve" else reject_version
    try:
        decide(approval, actor=Actor.of_request(request), reason=reason)
    except PermissionDenied as exc:
        return forbidden(request, f"Not decided: {exc}", back_url=version_url)
    except ValidationError as exc:
        messages.error(request, f"Not decided: {_validation_text(exc)}")
        return HttpResponseRedirect(version_url, status=303)
    except PromotionHeld as exc:
        # A page drawn before the gate held the candidate (or before a threshold changed) still posts Approve:
        # the service refuses it, and the page is drawn again with the reason, as the API's 409.
        messages.error(request, f"Not approved: {exc}")
        return _version_page(request, approval.version, status=409)
    if decision == "approve":
        messages.success(
            request, f"Approved {approval.version.version_id}: it is now the champion and devices are told to move."
        )
    else:
        messages.success(request, f"Rejected {approval.version.version_id}.")
    return HttpResponseRedirect(version_url, status=303)


@require_POST
@console_page()
def gate_override(request: HttpRequest, request_pk: int) -> HttpResponse:
    """An officer asks for a gate override, or a second officer grants the one waiting; the services decide who may."""
    approval = get_object_or_404(ApprovalRequest.objects.select_related("version"), pk=request_pk)
    version_url = reverse("console:version-detail", args=[approval.version.version_id])
    form = OverrideForm(request.POST)
    if not form.is_valid():
        return _version_page(request, approval.version, override_form=form, status=400)
    step, reason = form.cleaned_data["step"], form.cleaned_data["reason"]
    try:
        if step == "request":
            request_gate_override(approval, actor=Actor.of_request(request), reason=reason)
        else:
            waiting = GateOverride.objects.filter(request=approval, granted_at=None).select_related("request").first()
            if waiting is None:
                messages.error(request, "Not granted: no override of this request is waiting for a grant.")
                return HttpResponseRedirect(version_url, status=303)
            grant_gate_override(waiting, actor=Actor.of_request(request), reason=reason)
    except PermissionDenied as exc:
        return forbidden(request, f"Override refused: {exc}", back_url=version_url)
    except ValidationError as exc:
        messages.error(request, f"Override refused: {_validation_text(exc)}")
        return HttpResponseRedirect(version_url, status=303)
    if step == "request":
        messages.success(request, "Override asked for: a second officer must grant it before the version is approved.")
    else:
        messages.success(request, "Override granted: an officer may now approve the version despite the gate.")
    return HttpResponseRedirect(version_url, status=303)


@console_page()
def update_list(request: HttpRequest) -> HttpResponse:
    form = UpdateFilterForm(request.GET or None)
    updates = Update.objects.select_related("device", "base_version", "applied_in", "round")
    if form.is_valid():
        if form.cleaned_data["status"]:
            updates = updates.filter(status=form.cleaned_data["status"])
        if form.cleaned_data["device"]:
            updates = updates.filter(device__client_id=form.cleaned_data["device"])
        if form.cleaned_data["code"]:
            updates = updates.filter(rejection_code=form.cleaned_data["code"])
    by_status = dict(Update.objects.values_list("status").annotate(n=Count("id")).values_list("status", "n"))
    return render_page(
        request,
        "console/update_list.html",
        {
            "form": form,
            "page": _page(request, updates),
            "query": _query_without_page(request),
            "by_status": [(value, label, by_status.get(value, 0)) for value, label in UpdateStatus.choices],
        },
        nav="updates",
    )


@console_page()
def update_detail(request: HttpRequest, update_id: str) -> HttpResponse:
    update = get_object_or_404(
        Update.objects.select_related("device", "base_version", "applied_in", "round"), update_id=update_id
    )
    history = AuditEvent.objects.filter(object_type="federation.update", object_id=str(update.pk)).order_by(
        "created_at", "id"
    )
    return render_page(
        request,
        "console/update_detail.html",
        {
            "update": update,
            "routed_tokens": sorted(update.routed_tokens.items()) if isinstance(update.routed_tokens, dict) else [],
            "metrics": sorted(update.metrics.items()) if isinstance(update.metrics, dict) else [],
            "history": history,
        },
        nav="updates",
    )


def _filtered_events(form: AuditFilterForm) -> Any:
    events = AuditEvent.objects.select_related("actor")
    if form.is_valid():
        data = form.cleaned_data
        if data["verb"]:
            events = events.filter(verb__icontains=data["verb"])
        if data["actor"]:
            events = events.filter(actor_label__icontains=data["actor"])
        if data["actor_kind"]:
            events = events.filter(actor_kind=data["actor_kind"])
        if data["object_type"]:
            events = events.filter(object_type=data["object_type"])
        if data["object_id"]:
            events = events.filter(object_id=data["object_id"])
        if data["after"]:
            events = events.filter(created_at__gte=data["after"])
        if data["before"]:
            events = events.filter(created_at__lt=data["before"])
    return events


@console_page(AUDIT_READER_ROLES)
def audit_log(request: HttpRequest) -> HttpResponse:
    form = AuditFilterForm(request.GET or None)
    events = _filtered_events(form)
    return render_page(
        request,
        "console/audit_log.html",
        {"form": form, "page": _page(request, events), "query": _query_without_page(request)},
        nav="audit",
    )


@console_page(AUDIT_READER_ROLES)
def audit_export(request: HttpRequest, kind: str) -> HttpResponseBase:
    """The filtered trail as a download (the same filters as the page), with the hash-chain fields."""
    form = AuditFilterForm(request.GET or None)
    if request.GET and not form.is_valid():
        return HttpResponse(
            f"The filters are not valid: {form.errors.as_text()}", status=400, content_type="text/plain"
        )
    filters = {key: str(value) for key, value in request.GET.items() if key in form.fields and value}
    return audit_export_response(_filtered_events(form), kind=kind, actor=Actor.of_request(request), filters=filters)
