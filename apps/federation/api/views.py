"""REST views of the federation app. Devices see only their own records; every write goes through services."""

from datetime import timedelta
from typing import Any, ClassVar, cast

from django.conf import settings
from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied as ApiPermissionDenied
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
    CertificateRequestSerializer,
    CertificateResultSerializer,
    CloseRoundSerializer,
    DeviceKeySerializer,
    EdgeDeviceSerializer,
    EnrollmentResultSerializer,
    EnrollmentTokenCreateSerializer,
    EnrollmentTokenSerializer,
    EnrollSerializer,
    HeartbeatSerializer,
    IssuedEnrollmentTokenSerializer,
    PayloadReceiptSerializer,
    PayloadRefusalSerializer,
    PrivacyLedgerQuerySerializer,
    PrivacyLedgerSerializer,
    RevokeDeviceSerializer,
    RoundSerializer,
    TrainingTaskSerializer,
    UpdateEnvelopeInputSerializer,
    UpdateRefusalSerializer,
    UpdateSerializer,
)
from apps.federation.choices import RoundMode, RoundStatus
from apps.federation.identity import ca_certificate_pem, renew_certificate
from apps.federation.models import EdgeDevice, EnrollmentToken, Round, TrainingTask, Update
from apps.federation.privacy import privacy_ledger
from apps.federation.services import (
    PayloadRefused,
    close_round,
    create_training_task,
    enroll_device,
    issue_enrollment_token,
    open_round,
    parse_update_envelope,
    record_device_heartbeat,
    revoke_device,
    store_update_payload,
)
from apps.federation.updates import submit_update
from apps.governance.actors import Actor
from apps.registry.storage import artifact_root
from controlplane.metrics.families import record_outcome
from controlplane.schema import wire_schema
from fednested.aggregation import RejectionCode
from fednested.messaging.schemas import UpdateEnvelope

ENGINEER = frozenset({Role.ENGINEER})
DEVICE = frozenset({Role.DEVICE})
WITH_DEVICES = frozenset({Role.OFFICER, Role.ENGINEER, Role.DEVICE})
# Natural keys may hold dots; no NUL: PostgreSQL cannot even compare one (a lookup with it would be a 500, not a 404).
NATURAL_KEY_PATTERN = r"[^/\x00]+"
SHA256_HEADER = "X-Content-SHA256"
# Rejection codes (one vocabulary for uploads, envelopes and the bus; docs/api/device-protocol.md) → HTTP status
# of a refused upload or a refused envelope. A code not listed is a 422: the request was well-formed, its content
# is not acceptable.
REFUSAL_STATUS = {
    RejectionCode.MALFORMED: status.HTTP_400_BAD_REQUEST,
    RejectionCode.INVALID_UPDATE_ID: status.HTTP_400_BAD_REQUEST,
    RejectionCode.SHA256_MISSING: status.HTTP_400_BAD_REQUEST,
    RejectionCode.SHA256_MISMATCH: status.HTTP_400_BAD_REQUEST,
    RejectionCode.INCOMPLETE_BODY: status.HTTP_400_BAD_REQUEST,
    RejectionCode.UNKNOWN_CLIENT: status.HTTP_403_FORBIDDEN,
    RejectionCode.REVOKED_CLIENT: status.HTTP_403_FORBIDDEN,
    RejectionCode.BAD_SIGNATURE: status.HTTP_403_FORBIDDEN,
    RejectionCode.NOT_OWNER: status.HTTP_403_FORBIDDEN,
    RejectionCode.CONFLICT: status.HTTP_409_CONFLICT,
    RejectionCode.REPLAYED: status.HTTP_409_CONFLICT,
    RejectionCode.EXPIRED: status.HTTP_409_CONFLICT,
    RejectionCode.OVERSIZED: status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
}


def requesting_device(request: Request, doing: str, *, for_client_id: str | None = None) -> EdgeDevice:
    """The enrolled device the request authenticates as; 403 for anyone else (admins included: they are no device),
    and 403 `not_owner` when the route names another device (`for_client_id`): a device acts for itself only."""
    # With its current version: a heartbeat that repeats it is answered from this one query (record_device_heartbeat).
    device = EdgeDevice.objects.filter(user=cast(User, request.user)).select_related("user", "current_version").first()
    if device is None:
        raise ApiPermissionDenied(f"only an enrolled device {doing}", code="not_a_device")
    if for_client_id is not None and device.client_id != for_client_id:
        raise ApiPermissionDenied(
            f"you are device {device.client_id!r}, not {for_client_id!r}; a device {doing} for itself only",
            code="not_owner",
        )
    return device


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
        "heartbeat": DEVICE,
        "certificate": DEVICE,
    }

    def get_queryset(self) -> QuerySet[EdgeDevice]:
        queryset = EdgeDevice.objects.select_related("current_version").all()
        if role_of(self.request.user) == Role.DEVICE:
            return queryset.filter(user=cast(User, self.request.user))
        return queryset

    @extend_schema(request=HeartbeatSerializer, responses=EdgeDeviceSerializer)
    @action(detail=True, methods=["post"])
    def heartbeat(self, request: Request, client_id: str) -> Response:
        """The device reports the version it runs (after loading one); sets current_version and last_seen."""
        device = requesting_device(request, "reports its version", for_client_id=client_id)
        serializer = HeartbeatSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        device = record_device_heartbeat(device, current_version=serializer.validated_data["current_version"])
        return Response(EdgeDeviceSerializer(device).data)

    @extend_schema(request=CertificateRequestSerializer, responses={201: CertificateResultSerializer})
    @action(detail=True, methods=["post"])
    def certificate(self, request: Request, client_id: str) -> Response:
        """Renew the device's certificate before it expires (same key), or rotate to a new key: send a CSR."""
        device = requesting_device(request, "renews its certificate", for_client_id=client_id)
        serializer = CertificateRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        key = renew_certificate(device, serializer.validated_data["csr"], actor=Actor.of_request(request))
        body = {"key": DeviceKeySerializer(key).data, "ca_certificate": ca_certificate_pem()}
        return Response(body, status=status.HTTP_201_CREATED)

    @extend_schema(request=RevokeDeviceSerializer, responses=EdgeDeviceSerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, client_id: str) -> Response:
        serializer = RevokeDeviceSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        device = revoke_device(
            self.get_object(), actor=Actor.of_request(request), reason=serializer.validated_data["reason"]
        )
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
        token, plaintext = issue_enrollment_token(
            actor=Actor.of_request(request), note=data["note"], domain=data["domain"], ttl=ttl
        )
        body = dict(EnrollmentTokenSerializer(token).data)
        body["token"] = plaintext
        return Response(body, status=status.HTTP_201_CREATED)


class EnrollView(APIView):
    """Enroll a device with a one-time token and its CSR (no credentials needed: the token is the credential)."""

    authentication_classes = ()
    permission_classes = (AllowAny,)

    @extend_schema(
        request=EnrollSerializer, responses={201: EnrollmentResultSerializer, 200: EnrollmentResultSerializer}
    )
    def post(self, request: Request) -> Response:
        """201 enrolled; 200 the same device repeating an enrollment that went through (same token, id and key)."""
        serializer = EnrollSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        enrollment = enroll_device(
            token=data["token"],
            client_id=data["client_id"],
            csr=data["csr"],
            display_name=data["display_name"],
            domain=data["domain"],
            labels=data["labels"],
        )
        body = {
            "device": EdgeDeviceSerializer(enrollment.device).data,
            "api_token": enrollment.api_token,
            "key": DeviceKeySerializer(enrollment.key).data,
            "ca_certificate": ca_certificate_pem(),
            "repeated": enrollment.repeated,
        }
        return Response(body, status=status.HTTP_200_OK if enrollment.repeated else status.HTTP_201_CREATED)


class RoundViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[Round]):
    """Federation rounds: devices read them; engineers open and close them."""

    queryset = Round.objects.select_related("base_version", "opened_by", "candidate").prefetch_related("cohort").all()
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
            mode=data.get("mode", RoundMode.ASYNC),
            cohort=data.get("cohort", []),
            actor=Actor.of_request(request),
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
            actor=Actor.of_request(request),
            status=RoundStatus.CANCELLED if data["cancel"] else RoundStatus.CLOSED,
            reason=data["reason"],
        )
        return Response(RoundSerializer(round_).data)


class PrivacyLedgerView(APIView):
    """The federation's differential-privacy ledger (officers and engineers): ε spent so far, what a round with `dp`
    is checked against before it opens (docs/server-optimizers-and-privacy.md)."""

    action_roles: ClassVar[dict[str, frozenset[Role]]] = {"get": frozenset({Role.OFFICER, Role.ENGINEER})}

    @extend_schema(parameters=[PrivacyLedgerQuerySerializer], responses=PrivacyLedgerSerializer)
    def get(self, request: Request) -> Response:
        query = PrivacyLedgerQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        delta = query.validated_data["delta"]
        ledger = privacy_ledger()
        return Response(
            PrivacyLedgerSerializer(
                {
                    "delta": delta,
                    "epsilon": ledger.epsilon(delta),
                    "noised_aggregations": len(ledger.noise_multipliers),
                    "noise_multipliers": list(ledger.noise_multipliers),
                    "unprotected_aggregations": ledger.unprotected,
                }
            ).data
        )


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
            kind=data["kind"], params=data.get("params", {}), round_=data.get("round"), actor=Actor.of_request(request)
        )
        return Response(TrainingTaskSerializer(task).data, status=status.HTTP_201_CREATED)


class UpdateViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[Update]):
    """Edge updates: devices submit their own envelopes and see only their own updates.

    A submitted envelope goes through the same service as one from the bus: 201 buffered, 200 the identical envelope
    was already received, 422 recorded as rejected (the body names the code), 400/403/409/413 refused.
    """

    serializer_class = UpdateSerializer
    filterset_class = UpdateFilterSet
    lookup_field = "update_id"
    lookup_value_regex = NATURAL_KEY_PATTERN
    action_roles: ClassVar[dict[str, frozenset[Role]]] = {
        "list": WITH_DEVICES,
        "retrieve": WITH_DEVICES,
        "create": DEVICE,
        "payload": DEVICE,
    }

    def get_queryset(self) -> QuerySet[Update]:
        queryset = Update.objects.select_related("device", "base_version", "round", "applied_in").all()
        if role_of(self.request.user) == Role.DEVICE:
            return queryset.filter(device__user=cast(User, self.request.user))
        return queryset

    @extend_schema(
        # The wire schema the service validates the envelope against, published from its one declaration.
        request={"application/json": wire_schema(UpdateEnvelope)},
        responses={
            201: UpdateSerializer,
            200: UpdateSerializer,
            422: UpdateRefusalSerializer,
            400: UpdateRefusalSerializer,
            403: UpdateRefusalSerializer,
            409: UpdateRefusalSerializer,
            413: UpdateRefusalSerializer,
        },
    )
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = UpdateEnvelopeInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        # An admin has every API right but is no device; updates are tied to an enrolled device.
        device = requesting_device(request, "submits updates")
        envelope = parse_update_envelope(serializer.validated_data)
        outcome = submit_update(
            envelope,
            where="api:POST /api/v1/updates/",
            actor=Actor.device(device.client_id, device.user),
            sender=device,
        )
        record_outcome(outcome, source="api")
        if outcome.status in ("buffered", "duplicate") and outcome.update_pk is not None:
            update = self.get_queryset().get(pk=outcome.update_pk)
            created = outcome.status == "buffered"
            return Response(
                UpdateSerializer(update).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK
            )
        code = outcome.code or RejectionCode.MALFORMED
        body: dict[str, Any] = {"detail": outcome.message, "code": code.value, "status": outcome.status}
        if outcome.status == "rejected" and outcome.update_pk is not None:
            body["record"] = UpdateSerializer(self.get_queryset().get(pk=outcome.update_pk)).data
            return Response(body, status=status.HTTP_422_UNPROCESSABLE_ENTITY)
        return Response(body, status=REFUSAL_STATUS.get(code, status.HTTP_422_UNPROCESSABLE_ENTITY))

    @extend_schema(
        request={"application/octet-stream": OpenApiTypes.BINARY},
        parameters=[
            OpenApiParameter(SHA256_HEADER, str, OpenApiParameter.HEADER, required=True, description="sha256 (hex)")
        ],
        responses={
            201: PayloadReceiptSerializer,
            200: PayloadReceiptSerializer,
            400: PayloadRefusalSerializer,
            403: PayloadRefusalSerializer,
            409: PayloadRefusalSerializer,
            413: PayloadRefusalSerializer,
        },
    )
    @action(detail=True, methods=["put"])
    def payload(self, request: Request, update_id: str) -> Response:
        """Upload the update's adapter payload (claim check): 201 stored, 200 the same bytes were already stored."""
        device = requesting_device(request, "uploads update payloads")
        raw_length = request.META.get("CONTENT_LENGTH") or ""
        try:
            content_length = int(raw_length) if raw_length.strip() else None
        except ValueError:
            content_length = None
        try:
            receipt = store_update_payload(
                device,
                update_id,
                # Read straight from the WSGI/ASGI input, in chunks: the body never sits in memory whole.
                request._request,
                declared_sha256=request.headers.get(SHA256_HEADER, ""),
                content_length=content_length,
                max_bytes=settings.FEDNESTED_MAX_UPDATE_BYTES,
                root=artifact_root(),
            )
        except PayloadRefused as refusal:
            return Response({"detail": refusal.message, "code": refusal.code}, status=REFUSAL_STATUS[refusal.code])
        body = {"update_id": receipt.update_id, "uri": receipt.uri, "sha256": receipt.sha256, "bytes": receipt.bytes}
        return Response(body, status=status.HTTP_201_CREATED if receipt.created else status.HTTP_200_OK)
