"""REST serializers of the federation app: devices, enrollment, rounds, training tasks, updates."""

from collections.abc import Mapping
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from apps.accounts.models import User
from apps.federation.choices import RoundMode, TaskKind
from apps.federation.models import DeviceKey, EdgeDevice, EnrollmentToken, Round, TrainingTask, Update
from apps.federation.services import MAX_BUFFER_SIZE_K, MAX_ENROLLMENT_TOKEN_TTL, ROUND_ID_PATTERN
from apps.registry.models import ModelVersion
from apps.registry.services import VERSION_ID_PATTERN
from controlplane.parsers import StoredJSONField
from fednested.aggregation import RejectionCode
from fednested.identity.keys import MAX_PEM_BYTES
from fednested.messaging.schemas import CLIENT_ID_REGEX, SHA256_HEX_REGEX


class EdgeDeviceSerializer(serializers.ModelSerializer[EdgeDevice]):
    # Read-only related fields over nullable foreign keys say so (allow_null), or the schema publishes them as
    # strings that are served as null: null until the device first reports a version.
    current_version = serializers.SlugRelatedField[ModelVersion](
        slug_field="version_id", read_only=True, allow_null=True
    )
    labels = serializers.ListField(child=serializers.CharField(), read_only=True, help_text="Free-form string labels.")

    class Meta:
        model = EdgeDevice
        fields = (
            "client_id",
            "display_name",
            "domain",
            "labels",
            "status",
            "enrolled_at",
            "last_seen",
            "revoked_at",
            "current_version",
        )
        read_only_fields = fields


class RevokeDeviceSerializer(serializers.Serializer[dict[str, Any]]):
    reason = serializers.CharField(max_length=500)


class EnrollmentTokenSerializer(serializers.ModelSerializer[EnrollmentToken]):
    # Null once the issuing user is deleted (SET_NULL).
    created_by = serializers.SlugRelatedField[User](slug_field="username", read_only=True, allow_null=True)

    class Meta:
        model = EnrollmentToken
        fields: tuple[str, ...] = (
            "id",
            "token_prefix",
            "note",
            "domain",
            "expires_at",
            "used_at",
            "used_by_client_id",
            "created_by",
            "created_at",
        )
        read_only_fields = fields


class EnrollmentTokenCreateSerializer(serializers.Serializer[dict[str, Any]]):
    note = serializers.CharField(max_length=200, required=False, default="", allow_blank=True)
    domain = serializers.CharField(max_length=100, required=False, default="", allow_blank=True)
    ttl_seconds = serializers.IntegerField(
        min_value=1,
        # The service's limit, checked here too: a lifetime timedelta cannot hold (10^20 s) must be a 400.
        max_value=int(MAX_ENROLLMENT_TOKEN_TTL.total_seconds()),
        required=False,
        allow_null=True,
        default=None,
        help_text="Lifetime; default from settings.",
    )


class IssuedEnrollmentTokenSerializer(EnrollmentTokenSerializer):
    token = serializers.CharField(read_only=True, help_text="The one-time secret; shown only in this response.")

    class Meta(EnrollmentTokenSerializer.Meta):
        fields: tuple[str, ...] = (*EnrollmentTokenSerializer.Meta.fields, "token")
        read_only_fields = fields


class EnrollSerializer(serializers.Serializer[dict[str, Any]]):
    token = serializers.CharField(max_length=200)
    # The wire schemas' ClientId (enroll_device checks the same pattern): published, and refused here already.
    client_id = serializers.RegexField(
        CLIENT_ID_REGEX,
        max_length=128,
        error_messages={"invalid": "a client id starts with a letter or digit and uses only A-Z a-z 0-9 . _ : -"},
    )
    csr = serializers.CharField(
        max_length=MAX_PEM_BYTES,
        trim_whitespace=False,
        help_text="PEM certificate signing request made on the device (ECDSA P-256, subject CN = client_id); the "
        "private key never leaves the device.",
    )
    display_name = serializers.CharField(max_length=200, required=False, default="", allow_blank=True)
    domain = serializers.CharField(max_length=100, required=False, default="", allow_blank=True)
    labels = serializers.ListField(
        child=serializers.CharField(max_length=100), required=False, default=list, max_length=100
    )


class DeviceKeySerializer(serializers.ModelSerializer[DeviceKey]):
    """A device's registered key and, with a CA, its certificate (PEM)."""

    class Meta:
        model = DeviceKey
        fields = ("fingerprint", "serial", "not_after", "certificate_pem", "created_at", "revoked_at")
        read_only_fields = fields


class EnrollmentResultSerializer(serializers.Serializer[dict[str, Any]]):
    device = EdgeDeviceSerializer()
    api_token = serializers.CharField(help_text="The device's API token; shown only in this response.")
    key = DeviceKeySerializer(help_text="The registered key; its certificate when the control plane has a CA.")
    ca_certificate = serializers.CharField(
        allow_null=True, help_text="PEM of the federation CA (trust anchor for mTLS), or null without a CA."
    )
    repeated = serializers.BooleanField(help_text="True when this answers a retry of an enrollment that went through.")


class CertificateRequestSerializer(serializers.Serializer[dict[str, Any]]):
    csr = serializers.CharField(
        max_length=MAX_PEM_BYTES,
        trim_whitespace=False,
        help_text="PEM CSR for the same client id: the current key (renewal) or a new one (key rotation).",
    )


class CertificateResultSerializer(serializers.Serializer[dict[str, Any]]):
    key = DeviceKeySerializer()
    ca_certificate = serializers.CharField(allow_null=True)


# A synchronous round aggregates its whole cohort in one window, and no window takes more than K_max updates. Checked
# before the client ids are looked up, one query each.
MAX_COHORT_SIZE = MAX_BUFFER_SIZE_K


class RoundSerializer(serializers.ModelSerializer[Round]):
    base_version = serializers.SlugRelatedField[ModelVersion](
        slug_field="version_id", queryset=ModelVersion.objects.all()
    )
    opened_by = serializers.SlugRelatedField[User](slug_field="username", read_only=True, allow_null=True)
    round_id = serializers.RegexField(
        ROUND_ID_PATTERN.pattern,
        max_length=64,
        required=False,
        error_messages={"invalid": "a round id starts with a letter or digit and uses only A-Z a-z 0-9 . _ -"},
    )
    mode = serializers.ChoiceField(choices=RoundMode.choices, default=RoundMode.ASYNC)
    cohort = serializers.SlugRelatedField[EdgeDevice](
        slug_field="client_id",
        queryset=EdgeDevice.objects.all(),
        many=True,
        required=False,
        help_text="sync only: client ids of the devices expected to report.",
    )
    candidate = serializers.SlugRelatedField[ModelVersion](slug_field="version_id", read_only=True, allow_null=True)
    buffer_size_k = serializers.IntegerField(min_value=1, max_value=MAX_BUFFER_SIZE_K)
    config = StoredJSONField(
        required=False, help_text="Aggregation settings (fednested.aggregation.settings.ROUND_SETTING_KEYS)."
    )

    class Meta:
        model = Round
        fields = (
            "round_id",
            "mode",
            "series",
            "sequence",
            "base_version",
            "cohort",
            "status",
            "buffer_size_k",
            "deadline_at",
            "config",
            "opened_by",
            "opened_at",
            "closed_at",
            "candidate",
            "record",
        )
        read_only_fields = (
            "series",
            "sequence",
            "status",
            "opened_by",
            "opened_at",
            "closed_at",
            "candidate",
            "record",
        )

    def to_internal_value(self, data: Any) -> Any:
        cohort = data.get("cohort") if isinstance(data, Mapping) else None
        if isinstance(cohort, list) and len(cohort) > MAX_COHORT_SIZE:
            raise serializers.ValidationError(
                {"cohort": [f"a cohort has at most {MAX_COHORT_SIZE} devices, got {len(cohort)}"]}
            )
        return super().to_internal_value(data)


class CloseRoundSerializer(serializers.Serializer[dict[str, Any]]):
    cancel = serializers.BooleanField(default=False, help_text="Cancel instead of close.")
    reason = serializers.CharField(max_length=500, required=False, default="", allow_blank=True)


class PrivacyLedgerQuerySerializer(serializers.Serializer[dict[str, Any]]):
    delta = serializers.FloatField(
        default=1e-5, min_value=1e-12, max_value=0.5, help_text="The δ at which ε is reported (default 1e-5)."
    )


class PrivacyLedgerSerializer(serializers.Serializer[dict[str, Any]]):
    """The federation's differential-privacy ledger: every noised aggregation registered so far."""

    delta = serializers.FloatField()
    epsilon = serializers.FloatField(help_text="ε at δ composed over every noised aggregation (RDP accountant).")
    noised_aggregations = serializers.IntegerField()
    noise_multipliers = serializers.ListField(child=serializers.FloatField(), help_text="In registration order.")
    unprotected_aggregations = serializers.IntegerField(
        help_text="Aggregations that added no noise: the data in them is not covered by ε."
    )


class TrainingTaskSerializer(serializers.ModelSerializer[TrainingTask]):
    round = serializers.SlugRelatedField[Round](
        slug_field="round_id", queryset=Round.objects.all(), required=False, allow_null=True, default=None
    )
    kind = serializers.ChoiceField(choices=TaskKind.choices)
    params = StoredJSONField(required=False, help_text="Kind-specific; checked by the worker that runs the task.")
    created_by = serializers.SlugRelatedField[User](slug_field="username", read_only=True, allow_null=True)

    class Meta:
        model = TrainingTask
        fields = (
            "id",
            "kind",
            "status",
            "params",
            "round",
            "created_by",
            "created_at",
            "started_at",
            "finished_at",
            "error",
            "policy_decisions",
        )
        read_only_fields = (
            "id",
            "status",
            "created_by",
            "created_at",
            "started_at",
            "finished_at",
            "error",
            "policy_decisions",
        )


class RejectionSerializer(serializers.Serializer[dict[str, str]]):
    """Why an update was rejected: the stored rejection code and its message."""

    code = serializers.CharField()
    message = serializers.CharField()


class UpdateSerializer(serializers.ModelSerializer[Update]):
    client_id = serializers.CharField(source="device.client_id", read_only=True)
    base_version = serializers.SlugRelatedField[ModelVersion](slug_field="version_id", read_only=True)
    round = serializers.SlugRelatedField[Round](slug_field="round_id", read_only=True, allow_null=True)
    applied_in = serializers.SlugRelatedField[ModelVersion](slug_field="version_id", read_only=True, allow_null=True)
    rejection = serializers.SerializerMethodField()

    class Meta:
        model = Update
        fields = (
            "update_id",
            "client_id",
            "base_version",
            "round",
            "status",
            "rejection",
            "payload_uri",
            "payload_sha256",
            "payload_bytes",
            "examples",
            "staleness",
            "routed_tokens",
            "metrics",
            "received_at",
            "status_changed_at",
            "applied_in",
        )
        read_only_fields = fields

    @extend_schema_field(RejectionSerializer(allow_null=True))
    def get_rejection(self, update: Update) -> dict[str, str] | None:
        if not update.rejection_code:
            return None
        return {"code": update.rejection_code, "message": update.rejection_message}


# The refusal codes with what each means, as the schema lists them (SPECTACULAR_SETTINGS names the enum).
REJECTION_CODE_CHOICES = [(code.value, code.description) for code in RejectionCode]


class UpdateRefusalSerializer(serializers.Serializer[dict[str, Any]]):
    """Why an envelope was not buffered: `status` rejected (its row is in `record`) or refused (no row)."""

    detail = serializers.CharField()
    code = serializers.ChoiceField(choices=REJECTION_CODE_CHOICES)
    status = serializers.ChoiceField(choices=["rejected", "refused"])
    record = UpdateSerializer(required=False)


class PayloadRefusalSerializer(serializers.Serializer[dict[str, Any]]):
    """Why an update payload was not stored (docs/api/device-protocol.md §3)."""

    detail = serializers.CharField()
    code = serializers.ChoiceField(choices=REJECTION_CODE_CHOICES)


class UpdateEnvelopeInputSerializer(serializers.Serializer[dict[str, Any]]):
    """An UpdateEnvelope (wire schema v1) as JSON; validated field by field by the service."""

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise serializers.ValidationError(
                {"envelope": "the request body must be a JSON object (an UpdateEnvelope)"}
            )
        return data


class HeartbeatSerializer(serializers.Serializer[dict[str, Any]]):
    """What a device reports after loading a version (docs/api/device-protocol.md §6)."""

    current_version = serializers.RegexField(
        VERSION_ID_PATTERN.pattern,
        max_length=128,
        error_messages={"invalid": "a version id starts with a letter or digit and uses only A-Z a-z 0-9 . _ -"},
    )


class PayloadReceiptSerializer(serializers.Serializer[dict[str, Any]]):
    """The claim check of a stored update payload (docs/api/device-protocol.md §3)."""

    update_id = serializers.UUIDField()
    uri = serializers.CharField(help_text="artifacts://updates/<client id>/<update id>.safetensors")
    sha256 = serializers.RegexField(SHA256_HEX_REGEX)
    bytes = serializers.IntegerField(min_value=0)
