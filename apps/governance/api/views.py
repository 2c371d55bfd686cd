"""REST views of governance: approval requests (engineers request, officers decide) and the audit trail (officers)."""

from typing import Any, ClassVar

from django.http import StreamingHttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.generics import RetrieveAPIView
from rest_framework.request import Request
from rest_framework.response import Response

from apps.accounts.choices import Role
from apps.accounts.permissions import EVERY_ROLE_BUT_DEVICE
from apps.governance.actors import Actor
from apps.governance.api.filtersets import ApprovalRequestFilterSet, AuditEventFilterSet
from apps.governance.api.serializers import (
    ApprovalRequestSerializer,
    AuditEventSerializer,
    DecisionInputSerializer,
    ForgettingReportSerializer,
    GateHeldSerializer,
    GateOverrideSerializer,
    OverrideInputSerializer,
)
from apps.governance.export import CSV_MEDIA_TYPE, JSONL_MEDIA_TYPE, audit_export_response
from apps.governance.models import ApprovalRequest, AuditEvent, GateOverride
from apps.governance.services import (
    PromotionHeld,
    approve_version,
    grant_gate_override,
    reject_version,
    request_approval,
    request_gate_override,
)
from apps.registry.models import ForgettingReport

OFFICER = frozenset({Role.OFFICER})


class ApprovalRequestViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[ApprovalRequest]
):
    """Approval requests: engineers request approval of a candidate; an officer other than the requester decides."""

    queryset = ApprovalRequest.objects.select_related(
        "version__parent", "requested_by", "decision__decided_by"
    ).prefetch_related("gate_overrides__requested_by", "gate_overrides__granted_by")
    serializer_class = ApprovalRequestSerializer
    filterset_class = ApprovalRequestFilterSet
    action_roles: ClassVar[dict[str, frozenset[Role]]] = {
        "list": EVERY_ROLE_BUT_DEVICE,
        "retrieve": EVERY_ROLE_BUT_DEVICE,
        "create": frozenset({Role.ENGINEER}),
        "approve": OFFICER,
        "reject": OFFICER,
        "request_override": OFFICER,
        "grant_override": OFFICER,
    }

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        approval = request_approval(data["version"], actor=Actor.of_request(request), note=data.get("note", ""))
        return Response(ApprovalRequestSerializer(approval).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        request=DecisionInputSerializer,
        responses={
            200: ApprovalRequestSerializer,
            409: OpenApiResponse(GateHeldSerializer, description="The promotion gate holds the candidate."),
        },
    )
    @action(detail=True, methods=["post"])
    def approve(self, request: Request, pk: str) -> Response:
        serializer = DecisionInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            approval = approve_version(
                self.get_object(), actor=Actor.of_request(request), reason=serializer.validated_data["reason"]
            )
        except PromotionHeld as held:
            body = {"detail": str(held), "code": "gate_held", "version": held.version_id, **held.verdict.to_json()}
            return Response(GateHeldSerializer(body).data, status=status.HTTP_409_CONFLICT)
        return Response(ApprovalRequestSerializer(approval).data)

    @extend_schema(request=OverrideInputSerializer, responses={201: GateOverrideSerializer})
    @action(detail=True, methods=["post"], url_path="request-override")
    def request_override(self, request: Request, pk: str) -> Response:
        """An officer asks to approve a candidate the gate holds; a second officer must grant it."""
        serializer = OverrideInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        override = request_gate_override(
            self.get_object(), actor=Actor.of_request(request), reason=serializer.validated_data["reason"]
        )
        return Response(GateOverrideSerializer(override).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=OverrideInputSerializer, responses=GateOverrideSerializer)
    @action(detail=True, methods=["post"], url_path="grant-override")
    def grant_override(self, request: Request, pk: str) -> Response:
        """A second officer grants the override waiting on this request; then any officer may approve it."""
        serializer = OverrideInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        override = get_object_or_404(
            GateOverride.objects.select_related("request__version"), request=self.get_object(), granted_at=None
        )
        granted = grant_gate_override(
            override, actor=Actor.of_request(request), reason=serializer.validated_data["reason"]
        )
        return Response(GateOverrideSerializer(granted).data)

    @extend_schema(request=DecisionInputSerializer, responses=ApprovalRequestSerializer)
    @action(detail=True, methods=["post"])
    def reject(self, request: Request, pk: str) -> Response:
        serializer = DecisionInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        approval = reject_version(
            self.get_object(), actor=Actor.of_request(request), reason=serializer.validated_data["reason"]
        )
        return Response(ApprovalRequestSerializer(approval).data)


class AuditEventViewSet(viewsets.ReadOnlyModelViewSet[AuditEvent]):
    """The audit trail, newest first; officers (and admins) read it, nobody writes it through the API. The exports
    take the list's filters and stream the matching events in chain order, with their hash-chain fields, so a copy
    can be checked offline (`fednested audit verify-export`)."""

    queryset = AuditEvent.objects.all()
    serializer_class = AuditEventSerializer
    filterset_class = AuditEventFilterSet
    action_roles: ClassVar[dict[str, frozenset[Role]]] = {
        "list": OFFICER,
        "retrieve": OFFICER,
        "export_jsonl": OFFICER,
        "export_csv": OFFICER,
    }

    def _export(self, request: Request, kind: str) -> StreamingHttpResponse:
        events = self.filter_queryset(self.get_queryset())
        return audit_export_response(
            events,
            kind=kind,
            actor=Actor.of_request(request),
            filters={key: str(value) for key, value in request.query_params.items()},
        )

    @extend_schema(filters=True, responses={(200, JSONL_MEDIA_TYPE): OpenApiTypes.STR})
    @action(detail=False, methods=["get"], url_path="export-jsonl", pagination_class=None)
    def export_jsonl(self, request: Request) -> StreamingHttpResponse:
        """The matching events as JSON Lines, one event per line, in chain order."""
        return self._export(request, "jsonl")

    @extend_schema(filters=True, responses={(200, CSV_MEDIA_TYPE): OpenApiTypes.STR})
    @action(detail=False, methods=["get"], url_path="export-csv", pagination_class=None)
    def export_csv(self, request: Request) -> StreamingHttpResponse:
        """The matching events as CSV with a header row; `data` as JSON text."""
        return self._export(request, "csv")


class ForgettingReportView(RetrieveAPIView[ForgettingReport]):
    """A version's forgetting report: per-domain loss against its parent and earlier champions, forgetting and BWT."""

    queryset = ForgettingReport.objects.select_related("version")
    serializer_class = ForgettingReportSerializer
    lookup_field = "version__version_id"
    lookup_url_kwarg = "version_id"
    action_roles: ClassVar[dict[str, frozenset[Role]]] = {"get": EVERY_ROLE_BUT_DEVICE}
