"""REST views of governance: approval requests (engineers request, officers decide) and the audit trail (officers)."""

from typing import Any, ClassVar

from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from apps.accounts.choices import Role
from apps.accounts.permissions import EVERY_ROLE_BUT_DEVICE
from apps.governance.api.filtersets import ApprovalRequestFilterSet, AuditEventFilterSet
from apps.governance.api.serializers import ApprovalRequestSerializer, AuditEventSerializer, DecisionInputSerializer
from apps.governance.models import ApprovalRequest, AuditEvent
from apps.governance.services import approve_version, reject_version, request_approval

OFFICER = frozenset({Role.OFFICER})


class ApprovalRequestViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[ApprovalRequest]
):
    """Approval requests: engineers request approval of a candidate; an officer other than the requester decides."""

    queryset = ApprovalRequest.objects.select_related("version", "requested_by", "decision__decided_by").all()
    serializer_class = ApprovalRequestSerializer
    filterset_class = ApprovalRequestFilterSet
    action_roles: ClassVar[dict[str, frozenset[Role]]] = {
        "list": EVERY_ROLE_BUT_DEVICE,
        "retrieve": EVERY_ROLE_BUT_DEVICE,
        "create": frozenset({Role.ENGINEER}),
        "approve": OFFICER,
        "reject": OFFICER,
    }

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        approval = request_approval(data["version"], actor=request.user, note=data.get("note", ""))
        return Response(ApprovalRequestSerializer(approval).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=DecisionInputSerializer, responses=ApprovalRequestSerializer)
    @action(detail=True, methods=["post"])
    def approve(self, request: Request, pk: str) -> Response:
        serializer = DecisionInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        approval = approve_version(self.get_object(), actor=request.user, reason=serializer.validated_data["reason"])
        return Response(ApprovalRequestSerializer(approval).data)

    @extend_schema(request=DecisionInputSerializer, responses=ApprovalRequestSerializer)
    @action(detail=True, methods=["post"])
    def reject(self, request: Request, pk: str) -> Response:
        serializer = DecisionInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        approval = reject_version(self.get_object(), actor=request.user, reason=serializer.validated_data["reason"])
        return Response(ApprovalRequestSerializer(approval).data)


class AuditEventViewSet(viewsets.ReadOnlyModelViewSet[AuditEvent]):
    """The audit trail, newest first; officers (and admins) read it, nobody writes it through the API."""

    queryset = AuditEvent.objects.all()
    serializer_class = AuditEventSerializer
    filterset_class = AuditEventFilterSet
    action_roles: ClassVar[dict[str, frozenset[Role]]] = {"list": OFFICER, "retrieve": OFFICER}
