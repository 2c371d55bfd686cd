"""REST views of the registry: families, versions (with lineage) and aliases. Writes go through registry.services."""

from typing import Any, ClassVar

from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from apps.accounts.choices import Role
from apps.accounts.permissions import EVERY_ROLE_BUT_DEVICE
from apps.accounts.roles import role_of
from apps.registry.api.filtersets import ModelFamilyFilterSet, ModelVersionFilterSet
from apps.registry.api.serializers import (
    AliasMoveSerializer,
    AliasSerializer,
    LineageSerializer,
    ModelFamilySerializer,
    ModelVersionCreateSerializer,
    ModelVersionSerializer,
)
from apps.registry.choices import CHAMPION_ALIAS
from apps.registry.models import Alias, ModelFamily, ModelVersion
from apps.registry.services import ArtifactSpec, create_model_family, move_alias, register_version

ENGINEER = frozenset({Role.ENGINEER})
# Lookups by natural key; ids may contain dots, which DRF's default lookup pattern excludes.
NATURAL_KEY_PATTERN = r"[^/]+"


class ModelFamilyViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet[ModelFamily]
):
    """Model families: everyone but devices reads; engineers create."""

    queryset = ModelFamily.objects.select_related("created_by").all()
    serializer_class = ModelFamilySerializer
    filterset_class = ModelFamilyFilterSet
    lookup_field = "name"
    lookup_value_regex = NATURAL_KEY_PATTERN
    action_roles: ClassVar[dict[str, frozenset[Role]]] = {
        "list": EVERY_ROLE_BUT_DEVICE,
        "retrieve": EVERY_ROLE_BUT_DEVICE,
        "create": ENGINEER,
    }

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        family = create_model_family(
            name=data["name"],
            architecture=data["architecture"],
            config=data.get("config") or {},
            description=data.get("description", ""),
            actor=request.user,
        )
        return Response(ModelFamilySerializer(family).data, status=status.HTTP_201_CREATED)


class ModelVersionViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[ModelVersion]):
    """Model versions, immutable once registered: everyone but devices reads; engineers register."""

    queryset = ModelVersion.objects.select_related("family", "parent").prefetch_related("artifacts", "aliases").all()
    serializer_class = ModelVersionSerializer
    filterset_class = ModelVersionFilterSet
    lookup_field = "version_id"
    lookup_value_regex = NATURAL_KEY_PATTERN
    action_roles: ClassVar[dict[str, frozenset[Role]]] = {
        "list": EVERY_ROLE_BUT_DEVICE,
        "retrieve": EVERY_ROLE_BUT_DEVICE,
        "lineage": EVERY_ROLE_BUT_DEVICE,
        "create": ENGINEER,
    }

    @extend_schema(request=ModelVersionCreateSerializer, responses={201: ModelVersionSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = ModelVersionCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        version = register_version(
            family=data["family"],
            version_id=data["version_id"],
            parent=data["parent"],
            manifest=data["manifest"],
            artifact_uri=data["artifact_uri"],
            artifacts=[ArtifactSpec(**artifact) for artifact in data["artifacts"]],
            datasets=data["datasets"],
            runs=data["runs"],
            contributing_updates=data["contributing_updates"],
            actor=request.user,
        )
        return Response(ModelVersionSerializer(self.get_queryset().get(pk=version.pk)).data, status=201)

    @extend_schema(responses=LineageSerializer)
    @action(detail=True, methods=["get"])
    def lineage(self, request: Request, version_id: str) -> Response:
        version = self.get_object()
        lineage = {
            "version_id": version.version_id,
            "ancestors": [ancestor.version_id for ancestor in version.ancestors()],
            "edges": version.lineage_edges.select_related("source_version").all(),
            "children": list(version.children.values_list("version_id", flat=True)),
        }
        return Response(LineageSerializer(lineage).data)


class AliasViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[Alias]):
    """Aliases (champion, candidate, …). Devices read only `champion`; engineers move any alias but `champion`,
    which moves only through an approved approval request."""

    serializer_class = AliasSerializer
    lookup_field = "name"
    lookup_value_regex = NATURAL_KEY_PATTERN
    every_role = frozenset({Role.OFFICER, Role.ENGINEER, Role.DEVICE})
    action_roles: ClassVar[dict[str, frozenset[Role]]] = {"list": every_role, "retrieve": every_role, "move": ENGINEER}

    def get_queryset(self) -> QuerySet[Alias]:
        queryset = Alias.objects.select_related("version__family", "version__parent", "updated_by").prefetch_related(
            "version__artifacts", "version__aliases"
        )
        if role_of(self.request.user) == Role.DEVICE:
            return queryset.filter(name=CHAMPION_ALIAS)
        return queryset.all()

    @extend_schema(request=AliasMoveSerializer, responses=AliasSerializer)
    @action(detail=True, methods=["post"])
    def move(self, request: Request, name: str) -> Response:
        """Point the alias at another version (created on first use)."""
        if name == CHAMPION_ALIAS:
            raise PermissionDenied("the champion alias moves only when an officer approves an approval request")
        serializer = AliasMoveSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        alias = move_alias(name=name, version=serializer.validated_data["version"], actor=request.user)
        return Response(AliasSerializer(self.get_queryset().get(pk=alias.pk)).data)
