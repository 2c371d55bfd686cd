"""REST serializers of the registry: read shapes of families, versions, aliases; input shapes for the services."""

from typing import Any

from django.db import connection
from django.db.models import Model
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from apps.accounts.models import User
from apps.registry.choices import ArtifactPartition
from apps.registry.evidence import aggregation_evidence
from apps.registry.models import Alias, LineageEdge, ModelFamily, ModelVersion, VersionArtifact, VersionEvaluation
from apps.registry.services import ARTIFACT_URI_PATTERN, SLUG_PATTERN, VERSION_ID_PATTERN
from apps.registry.storage import artifact_root, public_location
from controlplane.parsers import StoredJSONField
from fednested.messaging.schemas import SHA256_HEX_REGEX


def column_max(model: type[Model], field_name: str) -> int:
    """The largest value the database column of an integer model field holds (what Django's own model validation
    checks): a larger one must be a 400 here, not a 500 from the INSERT."""
    internal_type = model._meta.get_field(field_name).get_internal_type()
    _, maximum = connection.ops.integer_field_range(internal_type)
    return int(maximum)


class StoreLocationField(serializers.CharField):
    """A location in the artifact store as clients see it: `artifacts://…`, relative to the store, never a server
    path (a row recorded by absolute path outside the store shows '': `manage.py check_store` lists it)."""

    def to_representation(self, value: Any) -> str:
        return public_location(str(value), artifact_root())


class ModelFamilySerializer(serializers.ModelSerializer[ModelFamily]):
    # create_model_family's pattern (stricter than the model's SlugField): published, and refused here already.
    name = serializers.RegexField(
        SLUG_PATTERN.pattern,
        max_length=64,
        error_messages={"invalid": "a family name is a lowercase slug: a-z 0-9 - _, starting with a letter or digit"},
    )
    # Read-only related fields over nullable foreign keys say so (allow_null): null once the user is deleted.
    created_by = serializers.SlugRelatedField[User](slug_field="username", read_only=True, allow_null=True)
    config = StoredJSONField(required=False, help_text="Model config (transformers config.json).")

    class Meta:
        model = ModelFamily
        fields = ("name", "architecture", "config", "description", "created_by", "created_at")
        read_only_fields = ("created_by", "created_at")


class VersionArtifactSerializer(serializers.ModelSerializer[VersionArtifact]):
    class Meta:
        model = VersionArtifact
        fields = ("file_name", "sha256", "size_bytes", "partition", "layer", "expert_index")


class ModelVersionSerializer(serializers.ModelSerializer[ModelVersion]):
    family = serializers.SlugRelatedField[ModelFamily](slug_field="name", read_only=True)
    # `parent` is also an attribute of every DRF field; the stubs type it as a serializer.
    parent = serializers.SlugRelatedField[ModelVersion](  # type: ignore[assignment]
        slug_field="version_id", read_only=True, allow_null=True
    )
    artifacts = VersionArtifactSerializer(many=True, read_only=True)
    aliases = serializers.SlugRelatedField[Alias](slug_field="name", many=True, read_only=True)
    artifact_uri = StoreLocationField(read_only=True, help_text="The version's folder: artifacts://<path>.")
    aggregation = serializers.SerializerMethodField(
        help_text="How an aggregated candidate was made: the robust rule and what it cut, the server optimiser, and "
        "the differential privacy applied (dp_noised is true only when noise was drawn; ε at δ over the "
        "federation's noised aggregations). Null for versions not made by aggregation."
    )

    mlflow = serializers.SerializerMethodField(
        help_text="Where the MLflow mirror holds the version (docs/mlflow.md): the runs of the jobs that made or "
        "evaluated it and its registered model version, with MLflow UI links when FEDNESTED_MLFLOW_UI_URL is set; "
        "empty until the relay has delivered them."
    )

    class Meta:
        model = ModelVersion
        fields = (
            "version_id",
            "family",
            "parent",
            "status",
            "manifest",
            "manifest_sha256",
            "artifact_uri",
            "artifacts",
            "aliases",
            "aggregation",
            "mlflow",
            "created_by_label",
            "created_at",
        )
        read_only_fields = fields

    @extend_schema_field(
        {
            "type": "object",
            "nullable": True,
            "properties": {
                "rule": {"type": "object"},
                "server_optimizer": {"type": "object"},
                "dp_noised": {"type": "boolean"},
                "privacy": {"type": "object", "nullable": True},
            },
            "required": ["rule", "server_optimizer", "dp_noised", "privacy"],
        }
    )
    def get_aggregation(self, version: ModelVersion) -> dict[str, Any] | None:
        return aggregation_evidence(version.manifest)

    @extend_schema_field(
        {
            "type": "object",
            "properties": {
                "runs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "run_id": {"type": "string"},
                            "task": {"type": "integer", "nullable": True},
                            "kind": {"type": "string", "nullable": True},
                            "url": {"type": "string", "nullable": True},
                        },
                        "required": ["run_id", "task", "kind", "url"],
                    },
                },
                "model_version": {
                    "type": "object",
                    "nullable": True,
                    "properties": {
                        "model": {"type": "string"},
                        "version": {"type": "string", "nullable": True},
                        "url": {"type": "string", "nullable": True},
                    },
                    "required": ["model", "version", "url"],
                },
            },
            "required": ["runs", "model_version"],
        }
    )
    def get_mlflow(self, version: ModelVersion) -> dict[str, Any]:
        from apps.governance.mlflow_sync import mlflow_links

        return mlflow_links(version)


class ArtifactInputSerializer(serializers.Serializer[dict[str, Any]]):
    file_name = serializers.CharField(max_length=255)
    sha256 = serializers.RegexField(
        SHA256_HEX_REGEX,
        help_text="64 lowercase hex digits.",
        error_messages={"invalid": "a sha256 is 64 lowercase hex digits"},
    )
    size_bytes = serializers.IntegerField(min_value=0, max_value=column_max(VersionArtifact, "size_bytes"))
    partition = serializers.ChoiceField(choices=ArtifactPartition.choices)
    layer = serializers.IntegerField(
        min_value=0, max_value=column_max(VersionArtifact, "layer"), required=False, allow_null=True, default=None
    )
    expert_index = serializers.IntegerField(
        min_value=0,
        max_value=column_max(VersionArtifact, "expert_index"),
        required=False,
        allow_null=True,
        default=None,
    )


class ModelVersionCreateSerializer(serializers.Serializer[dict[str, Any]]):
    """Input of `register_version`: the version's identity, manifest, files and lineage."""

    family = serializers.SlugRelatedField[ModelFamily](slug_field="name", queryset=ModelFamily.objects.all())
    version_id = serializers.RegexField(
        VERSION_ID_PATTERN.pattern,
        max_length=128,
        error_messages={"invalid": "a version id starts with a letter or digit and uses only A-Z a-z 0-9 . _ -"},
    )
    parent = serializers.SlugRelatedField[ModelVersion](  # type: ignore[assignment]
        slug_field="version_id", queryset=ModelVersion.objects.all(), required=False, allow_null=True, default=None
    )
    manifest = StoredJSONField()
    artifact_uri = serializers.RegexField(
        ARTIFACT_URI_PATTERN.pattern, max_length=200, error_messages={"invalid": "an artifact URI has no whitespace"}
    )
    artifacts = ArtifactInputSerializer(many=True, allow_empty=False)
    datasets = serializers.ListField(child=serializers.CharField(max_length=200), required=False, default=list)
    runs = serializers.ListField(child=serializers.CharField(max_length=200), required=False, default=list)
    contributing_updates = serializers.ListField(
        child=serializers.CharField(max_length=200), required=False, default=list
    )


class LineageEdgeSerializer(serializers.ModelSerializer[LineageEdge]):
    # Null for edges to datasets, runs and updates.
    source_version = serializers.SlugRelatedField[ModelVersion](
        slug_field="version_id", read_only=True, allow_null=True
    )

    class Meta:
        model = LineageEdge
        fields = ("kind", "source_ref", "source_version")


class LineageSerializer(serializers.Serializer[dict[str, Any]]):
    """A version's lineage: the parent chain, what it was derived from, and what was derived from it."""

    version_id = serializers.CharField()
    ancestors = serializers.ListField(child=serializers.CharField(), help_text="Parent first, root last.")
    edges = LineageEdgeSerializer(many=True)
    children = serializers.ListField(child=serializers.CharField())


class AliasSerializer(serializers.ModelSerializer[Alias]):
    version = ModelVersionSerializer(read_only=True)
    updated_by = serializers.SlugRelatedField[User](slug_field="username", read_only=True, allow_null=True)

    class Meta:
        model = Alias
        fields = ("name", "version", "updated_by", "updated_at")


class AliasMoveSerializer(serializers.Serializer[dict[str, Any]]):
    version = serializers.SlugRelatedField[ModelVersion](slug_field="version_id", queryset=ModelVersion.objects.all())


class VersionEvaluationSerializer(serializers.ModelSerializer[VersionEvaluation]):
    """One domain's held-out scores of a version, beside its parent's (before/after)."""

    parent_version = serializers.SlugRelatedField[ModelVersion](
        slug_field="version_id", read_only=True, allow_null=True
    )
    loss_change = serializers.FloatField(read_only=True, allow_null=True, help_text="loss − parent_loss.")
    heldout = StoreLocationField(read_only=True, help_text="The held-out sets scored: artifacts://<folder> or a name.")

    class Meta:
        model = VersionEvaluation
        fields = (
            "domain",
            "loss",
            "perplexity",
            "tokens",
            "records",
            "parent_version",
            "parent_loss",
            "parent_perplexity",
            "loss_change",
            "heldout",
            "evaluated_by_label",
            "evaluated_at",
        )
        read_only_fields = fields
