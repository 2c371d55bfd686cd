"""Admin of the registry: everything read-only (versions are immutable; aliases move through approvals)."""

from django.contrib import admin

from apps.governance.admin_mixins import ReadOnlyAdminMixin
from apps.registry.models import (
    Alias,
    ForgettingReport,
    LineageEdge,
    ModelFamily,
    ModelVersion,
    VersionArtifact,
    VersionEvaluation,
)


@admin.register(ModelFamily)
class ModelFamilyAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("name", "architecture", "created_by", "created_at")
    list_filter = ("architecture",)
    search_fields = ("name", "architecture", "description")


class VersionArtifactInline(ReadOnlyAdminMixin, admin.TabularInline):  # type: ignore[type-arg]
    model = VersionArtifact


class LineageEdgeInline(ReadOnlyAdminMixin, admin.TabularInline):  # type: ignore[type-arg]
    model = LineageEdge
    fk_name = "version"


class VersionEvaluationInline(ReadOnlyAdminMixin, admin.TabularInline):  # type: ignore[type-arg]
    model = VersionEvaluation
    fk_name = "version"
    fields = ("domain", "loss", "parent_loss", "perplexity", "parent_perplexity", "tokens", "evaluated_at")


@admin.register(ModelVersion)
class ModelVersionAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("version_id", "family", "status", "parent", "created_by_label", "created_at")
    list_filter = ("status", "family", "created_at")
    search_fields = ("version_id", "manifest_sha256", "created_by_label")
    inlines = (VersionArtifactInline, LineageEdgeInline, VersionEvaluationInline)


@admin.register(VersionArtifact)
class VersionArtifactAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("version", "file_name", "partition", "layer", "expert_index", "size_bytes", "sha256")
    list_filter = ("partition",)
    search_fields = ("version__version_id", "file_name", "sha256")


@admin.register(LineageEdge)
class LineageEdgeAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("version", "kind", "source_ref", "source_version")
    list_filter = ("kind",)
    search_fields = ("version__version_id", "source_ref")


@admin.register(Alias)
class AliasAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("name", "version", "updated_by", "updated_at")
    search_fields = ("name", "version__version_id")


@admin.register(VersionEvaluation)
class VersionEvaluationAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("version", "domain", "loss", "parent_loss", "perplexity", "tokens", "evaluated_at")
    list_filter = ("domain", "evaluated_at")
    search_fields = ("version__version_id", "domain", "heldout")


@admin.register(ForgettingReport)
class ForgettingReportAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    """Written by the evaluation job only: what the promotion gate and the officers read must not be edited here."""

    list_display = ("version", "average_forgetting", "backward_transfer", "computed_by_label", "computed_at")
    search_fields = ("version__version_id", "computed_by_label")
    date_hierarchy = "computed_at"
