"""REST serializers of the registry: read shapes of families, versions, aliases; input shapes for the services."""

from typing import Any, ClassVar

from django.db import connection
from django.db.models import Model
from rest_framework import serializers

from apps.accounts.models import User
from apps.registry.choices import ArtifactPartition
from apps.registry.models import Alias, LineageEdge, ModelFamily, ModelVersion, VersionArtifact, VersionEvaluation
from controlplane.parsers import StoredJSONField


def column_max(model: type[Model], field_name: str) -> int:
    """The largest value the database column of an integer model field holds (what Django's own model validation
    checks): a larger one must be a 400 here, not a 500 from the INSERT."""
    internal_type = model._meta.get_field(field_name).get_internal_type()
    _, maximum = connection.ops.integer_field_range(internal_type)
    return int(maximum)


class ModelFamilySerializer(serializers.ModelSerializer[ModelFamily]):
    created_by = serializers.SlugRelatedField[User](slug_field="username", read_only=True)
    config = StoredJSONField(required=False, help_text="Model config (transformers config.json).")

    class Meta:
        model = ModelFamily
        fields = ("name", "architecture", "config", "description", "created_by", "created_at")
        read_only_fields = ("created_by", "created_at")
        # Uniqueness is the service's check, with a message that names the family.
        extra_kwargs: ClassVar[dict[str, Any]] = {"name": {"validators": []}}


class VersionArtifactSerializer(serializers.ModelSerializer[VersionArtifact]):
    class Meta:
        model = VersionArtifact
        fields = ("file_name", "sha256", "size_bytes", "partition", "layer", "expert_index")


class ModelVersionSerializer(serializers.ModelSerializer[ModelVersion]):
    family = serializers.SlugRelatedField[ModelFamily](slug_field="name", read_only=True)
    # `parent` is also an attribute of every DRF field; the stubs type it as a serializer.
    parent = serializers.SlugRelatedField[ModelVersion](slug_field="version_id", read_only=True)  # type: ignore[assignment]
    artifacts = VersionArtifactSerializer(many=True, read_only=True)
    aliases = serializers.SlugRelatedField[Alias](slug_field="name", many=True, read_only=True)

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
            "created_by_label",
            "created_at",
        )
        read_only_fields = fields


class ArtifactInputSerializer(serializers.Serializer[dict[str, Any]]):
    file_name = serializers.CharField(max_length=255)
    sha256 = serializers.RegexField(r"^[0-9a-f]{64}$", help_text="64 lowercase hex digits.")
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
    version_id = serializers.CharField(max_length=128)
    parent = serializers.SlugRelatedField[ModelVersion](  # type: ignore[assignment]
        slug_field="version_id", queryset=ModelVersion.objects.all(), required=False, allow_null=True, default=None
    )
    manifest = StoredJSONField()
    artifact_uri = serializers.CharField(max_length=200)
    artifacts = ArtifactInputSerializer(many=True)
    datasets = serializers.ListField(child=serializers.CharField(max_length=200), required=False, default=list)
    runs = serializers.ListField(child=serializers.CharField(max_length=200), required=False, default=list)
    contributing_updates = serializers.ListField(
        child=serializers.CharField(max_length=200), required=False, default=list
    )


class LineageEdgeSerializer(serializers.ModelSerializer[LineageEdge]):
    source_version = serializers.SlugRelatedField[ModelVersion](slug_field="version_id", read_only=True)

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
    updated_by = serializers.SlugRelatedField[User](slug_field="username", read_only=True)

    class Meta:
        model = Alias
        fields = ("name", "version", "updated_by", "updated_at")


class AliasMoveSerializer(serializers.Serializer[dict[str, Any]]):
    version = serializers.SlugRelatedField[ModelVersion](slug_field="version_id", queryset=ModelVersion.objects.all())


class VersionEvaluationSerializer(serializers.ModelSerializer[VersionEvaluation]):
    """One domain's held-out scores of a version, beside its parent's (before/after)."""

    parent_version = serializers.SlugRelatedField[ModelVersion](slug_field="version_id", read_only=True)
    loss_change = serializers.FloatField(read_only=True, allow_null=True, help_text="loss − parent_loss.")

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
