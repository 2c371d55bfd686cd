"""REST views of the federation app. Devices see only their own records; every write goes through services."""

from datetime import timedelta
from typing import Any, ClassVar, cast

from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.accounts.choices import Role
from apps.accounts.models import User
from apps.accounts.permissions import EVERY_ROLE_BUT_DEVICE
from apps.accounts.roles import role_of
from apps.federation.api.filtersets import (
    EdgeDeviceFilterSet,
    EnrollmentTokenFilterSet,
    RoundFilterSet,
    TrainingTaskFilterSet,
    UpdateFilterSet,
)
from apps.federation.api.serializers import (
    CloseRoundSerializer,
    EdgeDeviceSerializer,
    EnrollmentResultSerializer,
    EnrollmentTokenCreateSerializer,
    EnrollmentTokenSerializer,
    EnrollSerializer,
    IssuedEnrollmentTokenSerializer,
    RevokeDeviceSerializer,
    RoundSerializer,
    TrainingTaskSerializer,
    UpdateEnvelopeInputSerializer,
    UpdateSerializer,
)
from apps.federation.choices import RoundStatus
from apps.federation.models import EdgeDevice, EnrollmentToken, Round, TrainingTask, Update
from apps.federation.services import (
    close_round,
    create_training_task,
    enroll_device,
    issue_enrollment_token,
    open_round,
    receive_update,
    revoke_device,
)

ENGINEER = frozenset({Role.ENGINEER})
WITH_DEVICES = frozenset({Role.OFFICER, Role.ENGINEER, Role.DEVICE})
NATURAL_KEY_PATTERN = r"[^/]+"


class EdgeDeviceViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[EdgeDevice]):
    """Enrolled devices; a device sees only itself. Engineers revoke."""

    serializer_class = EdgeDeviceSerializer
    filterset_class = EdgeDeviceFilterSet
    lookup_field = "client_id"
    lookup_value_regex = NATURAL_KEY_PATTERN
    action_roles: ClassVar[dict[str, frozenset[Role]]] = {
        "list": WITH_DEVICES,
        "retrieve": WITH_DEVICES,
        "revoke": ENGINEER,
    }

    def get_queryset(self) -> QuerySet[EdgeDevice]:
        queryset = EdgeDevice.objects.select_related("current_version").all()
        if role_of(self.request.user) == Role.DEVICE:
            return queryset.filter(user=cast(User, self.request.user))
        return queryset

    @extend_schema(request=RevokeDeviceSerializer, responses=EdgeDeviceSerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, client_id: str) -> Response:
        serializer = RevokeDeviceSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        device = revoke_device(self.get_object(), actor=request.user, reason=serializer.validated_data["reason"])
        return Response(EdgeDeviceSerializer(device).data)


class EnrollmentTokenViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[EnrollmentToken]
):
    """One-time enrollment tokens: engineers issue them (the secret appears once, in the 201 response)."""

    queryset = EnrollmentToken.objects.select_related("created_by").all()
    serializer_class = EnrollmentTokenSerializer
    filterset_class = EnrollmentTokenFilterSet
    action_roles: ClassVar[dict[str, frozenset[Role]]] = {
        "list": EVERY_ROLE_BUT_DEVICE,
        "retrieve": EVERY_ROLE_BUT_DEVICE,
        "create": ENGINEER,
    }

    @extend_schema(request=EnrollmentTokenCreateSerializer, responses={201: IssuedEnrollmentTokenSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = EnrollmentTokenCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        ttl = timedelta(seconds=data["ttl_seconds"]) if data["ttl_seconds"] else None
        token, plaintext = issue_enrollment_token(actor=request.user, note=data["note"], domain=data["domain"], ttl=ttl)
        body = dict(EnrollmentTokenSerializer(token).data)
        body["token"] = plaintext
        return Response(body, status=status.HTTP_201_CREATED)


class EnrollView(APIView):
    """Enroll a device with a one-time token (no credentials needed: the token is the credential)."""

    authentication_classes = ()
    permission_classes = (AllowAny,)

    @extend_schema(request=EnrollSerializer, responses={201: EnrollmentResultSerializer, 400: OpenApiResponse()})
    def post(self, request: Request) -> Response:
        serializer = EnrollSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        enrollment = enroll_device(
            token=data["token"],
            client_id=data["client_id"],
            display_name=data["display_name"],
            domain=data["domain"],
            labels=data["labels"],
        )
        body = {"device": EdgeDeviceSerializer(enrollment.device).data, "api_token": enrollment.api_token}
        return Response(body, status=status.HTTP_201_CREATED)


class RoundViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[Round]):
    """Federation rounds: devices read them; engineers open and close them."""

    queryset = Round.objects.select_related("base_version", "opened_by").all()
    serializer_class = RoundSerializer
    filterset_class = RoundFilterSet
    lookup_field = "round_id"
    lookup_value_regex = NATURAL_KEY_PATTERN
    action_roles: ClassVar[dict[str, frozenset[Role]]] = {
        "list": WITH_DEVICES,
        "retrieve": WITH_DEVICES,
        "create": ENGINEER,
        "close": ENGINEER,
    }

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        round_ = open_round(
            base_version=data["base_version"],
            buffer_size_k=data["buffer_size_k"],
            deadline_at=data["deadline_at"],
            config=data.get("config") or {},
            round_id=data.get("round_id"),
            actor=request.user,
        )
        return Response(RoundSerializer(round_).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=CloseRoundSerializer, responses=RoundSerializer)
    @action(detail=True, methods=["post"])
    def close(self, request: Request, round_id: str) -> Response:
        serializer = CloseRoundSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        round_ = close_round(
            self.get_object(),
            actor=request.user,
            status=RoundStatus.CANCELLED if data["cancel"] else RoundStatus.CLOSED,
            reason=data["reason"],
        )
        return Response(RoundSerializer(round_).data)


class TrainingTaskViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[TrainingTask]):
    """Tier-1 jobs: engineers create them (sent to the worker queue of their kind after commit)."""

    queryset = TrainingTask.objects.select_related("round", "created_by").all()
    serializer_class = TrainingTaskSerializer
    filterset_class = TrainingTaskFilterSet
    action_roles: ClassVar[dict[str, frozenset[Role]]] = {
        "list": EVERY_ROLE_BUT_DEVICE,
        "retrieve": EVERY_ROLE_BUT_DEVICE,
        "create": ENGINEER,
    }

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        task = create_training_task(
            kind=data["kind"], params=data.get("params") or {}, round_=data.get("round"), actor=request.user
        )
        return Response(TrainingTaskSerializer(task).data, status=status.HTTP_201_CREATED)


class UpdateViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[Update]):
    """Edge updates: devices submit their own envelopes (201 new, 200 resend) and see only their own updates."""

    serializer_class = UpdateSerializer
    filterset_class = UpdateFilterSet
    lookup_field = "update_id"
    lookup_value_regex = NATURAL_KEY_PATTERN
    action_roles: ClassVar[dict[str, frozenset[Role]]] = {
        "list": WITH_DEVICES,
        "retrieve": WITH_DEVICES,
        "create": frozenset({Role.DEVICE}),
    }

    def get_queryset(self) -> QuerySet[Update]:
        queryset = Update.objects.select_related("device", "base_version", "round", "applied_in").all()
        if role_of(self.request.user) == Role.DEVICE:
            return queryset.filter(device__user=cast(User, self.request.user))
        return queryset

    @extend_schema(request=UpdateEnvelopeInputSerializer, responses={201: UpdateSerializer, 200: UpdateSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = UpdateEnvelopeInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        device = EdgeDevice.objects.filter(user=cast(User, request.user)).first()
        if device is None:
            # An admin has every API right but is no device; updates are tied to an enrolled device.
            raise PermissionDenied("only an enrolled device submits updates")
        update, created = receive_update(serializer.validated_data, device=device)
        return Response(
            UpdateSerializer(update).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK
        )
