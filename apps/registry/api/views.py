"""REST views of the registry: families, versions (with lineage, evaluations and files) and aliases.

Writes go through registry.services; version files are streamed from the artifact store.
"""

import json
import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import FileResponse, HttpResponse
from django.http.response import HttpResponseBase
from django.utils.http import parse_etags
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from apps.accounts.choices import Role
from apps.accounts.permissions import EVERY_ROLE_BUT_DEVICE
from apps.accounts.roles import role_of
from apps.governance.actors import Actor
from apps.registry.api.alias_representations import alias_representation
from apps.registry.api.filtersets import ModelFamilyFilterSet, ModelVersionFilterSet
from apps.registry.api.serializers import (
    AliasMoveSerializer,
    AliasSerializer,
    LineageSerializer,
    ModelFamilySerializer,
    ModelVersionCreateSerializer,
    ModelVersionSerializer,
    VersionEvaluationSerializer,
)
from apps.registry.choices import CHAMPION_ALIAS
from apps.registry.models import Alias, ModelFamily, ModelVersion
from apps.registry.services import (
    MANIFEST_FILE_NAME,
    ArtifactSpec,
    canonical_manifest_bytes,
    create_model_family,
    move_alias,
    register_version,
)
from apps.registry.storage import artifact_path, artifact_root, file_inside, store_relative

logger = logging.getLogger(__name__)

ENGINEER = frozenset({Role.ENGINEER})
WITH_DEVICES = frozenset({Role.OFFICER, Role.ENGINEER, Role.DEVICE})
# Lookups by natural key; ids may contain dots, which DRF's default lookup pattern excludes. No NUL: PostgreSQL
# cannot even compare one (a lookup with it would be a 500, not a 404).
NATURAL_KEY_PATTERN = r"[^/\x00]+"
# A response header of the alias answer (200 and 304).
ETAG_HEADER = OpenApiParameter(
    "ETag",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    response=[200, 304],
    description="Strong validator of the answer (quoted sha256 of its canonical JSON).",
)
# The `code` of a download refused because the store does not hold the registered file (docs/api/device-protocol.md).
ARTIFACT_UNAVAILABLE = "artifact_unavailable"


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
            actor=Actor.of_request(request),
        )
        return Response(ModelFamilySerializer(family).data, status=status.HTTP_201_CREATED)


class OctetStreamRenderer(BaseRenderer):
    """Lets a client that asks for `application/octet-stream` download files; error bodies stay JSON."""

    media_type = "application/octet-stream"
    format = "bin"
    charset = None
    render_style = "binary"

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None) -> bytes:
        if isinstance(data, bytes):
            return data
        # An error body (a view or DRF refused): JSON, and labelled so, whatever media type the client asked for.
        response = (renderer_context or {}).get("response")
        if response is not None:
            response["Content-Type"] = "application/json"
        return json.dumps(data).encode("utf-8")


class ModelVersionViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[ModelVersion]):
    """Model versions, immutable once registered: everyone but devices reads; engineers register.

    Devices download the files of the champion only (docs/api/device-protocol.md §2).
    """

    queryset = ModelVersion.objects.select_related("family", "parent").prefetch_related("artifacts", "aliases").all()
    serializer_class = ModelVersionSerializer
    filterset_class = ModelVersionFilterSet
    lookup_field = "version_id"
    lookup_value_regex = NATURAL_KEY_PATTERN
    action_roles: ClassVar[dict[str, frozenset[Role]]] = {
        "list": EVERY_ROLE_BUT_DEVICE,
        "retrieve": EVERY_ROLE_BUT_DEVICE,
        "lineage": EVERY_ROLE_BUT_DEVICE,
        "evaluations": EVERY_ROLE_BUT_DEVICE,
        "files": WITH_DEVICES,
        "create": ENGINEER,
    }

    def get_queryset(self) -> QuerySet[ModelVersion]:
        queryset = super().get_queryset()
        if role_of(self.request.user) == Role.DEVICE:
            # What an officer approved is what reaches devices: the version the champion alias names now.
            return queryset.filter(aliases__name=CHAMPION_ALIAS)
        return queryset

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
            actor=Actor.of_request(request),
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

    @extend_schema(responses=VersionEvaluationSerializer(many=True))
    @action(detail=True, methods=["get"], pagination_class=None, filterset_class=None)
    def evaluations(self, request: Request, version_id: str) -> Response:
        """The version's per-domain held-out scores with its parent's on the same sets (empty: not evaluated)."""
        version = self.get_object()
        rows = version.evaluations.select_related("parent_version").order_by("domain")
        return Response(VersionEvaluationSerializer(rows, many=True).data)

    @extend_schema(
        responses={
            (200, "application/octet-stream"): OpenApiResponse(OpenApiTypes.BINARY, description="The file's bytes."),
            404: OpenApiResponse(description="No such version (for devices: not the champion) or file."),
            410: OpenApiResponse(
                description="`artifact_unavailable`: a registered file the artifact store no longer holds as "
                "registered (missing, changed size, outside the store); devices stop asking until an operator "
                "repairs the store (`manage.py check_store`)."
            ),
        }
    )
    @action(
        detail=True,
        methods=["get"],
        url_path=r"files/(?P<file_name>[^\x00]+)",
        renderer_classes=[JSONRenderer, OctetStreamRenderer],
        filterset_class=None,
    )
    def files(self, request: Request, version_id: str, file_name: str) -> HttpResponseBase:
        """One file of the version, as stored: only files the version lists, plus `manifest.json`."""
        version = self.get_object()
        artifact = version.artifacts.filter(file_name=file_name).first()
        if artifact is None and file_name == MANIFEST_FILE_NAME:
            # The version lists no manifest file of its own: its manifest_sha256 is that of the canonical JSON.
            return HttpResponse(canonical_manifest_bytes(version.manifest), content_type="application/octet-stream")
        if artifact is None:
            raise NotFound(f"version {version.version_id!r} has no file {file_name!r}")
        root = artifact_root()
        try:
            path = file_inside(artifact_path(version.artifact_uri, root), file_name)
        except ValueError as error:
            logger.error("version %r: artifact URI %r: %s", version.version_id, version.artifact_uri, error)
            return _store_fault(version, file_name, "lies outside the artifact store")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return _store_fault(
                version,
                file_name,
                f"is registered but the artifact store holds no {store_relative(path, root)}",
            )
        if size != artifact.size_bytes:
            return _store_fault(
                version,
                file_name,
                f"has {size} bytes in the artifact store, the registry says {artifact.size_bytes}",
            )
        response = FileResponse(path.open("rb"), content_type="application/octet-stream")
        response["Content-Length"] = str(size)
        response["X-Content-SHA256"] = artifact.sha256
        return response


def _store_fault(version: ModelVersion, file_name: str, what: str) -> Response:
    """A registered file the store does not hold as registered (a store moved without its database, a file lost):
    410, so devices stop asking until an operator repairs the store (`manage.py check_store` lists every such file).
    Logged for the operators; the body names files relative to the store only."""
    detail = f"file {file_name!r} of version {version.version_id!r} {what}"
    logger.error("%s", detail)
    body: Mapping[str, str] = {"detail": detail, "code": ARTIFACT_UNAVAILABLE}
    return Response(body, status=status.HTTP_410_GONE)


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

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "If-None-Match",
                OpenApiTypes.STR,
                OpenApiParameter.HEADER,
                description="The ETag of an answer the client holds: 304 without a body while it is still current.",
            ),
            ETAG_HEADER,
        ],
        responses={
            200: OpenApiResponse(
                AliasSerializer, description="The alias and its version; `ETag` identifies this answer."
            ),
            304: OpenApiResponse(description="The answer named by If-None-Match is still current (no body)."),
        },
    )
    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """One alias with its version: what devices poll (the champion). Answers carry an ETag; a poll that sends
        it back in If-None-Match gets 304 while the alias, its version's status and aliases are unchanged."""
        name = str(kwargs[self.lookup_field])
        if role_of(request.user) == Role.DEVICE and name != CHAMPION_ALIAS:
            raise NotFound(f"no alias {name!r} (devices read only {CHAMPION_ALIAS!r})")
        try:
            representation = alias_representation(
                name, lambda: AliasSerializer(self.get_queryset().get(name=name)).data
            )
        except Alias.DoesNotExist:
            representation = None  # deleted (in the admin) between the fingerprint and the build
        if representation is None:
            raise NotFound(f"no alias {name!r}")
        headers = {"ETag": representation.etag, "Cache-Control": "private, no-cache"}
        presented = parse_etags(request.headers.get("If-None-Match", ""))
        if representation.etag in presented or "*" in presented:
            return Response(status=status.HTTP_304_NOT_MODIFIED, headers=headers)
        return Response(representation.data, headers=headers)

    @extend_schema(request=AliasMoveSerializer, responses=AliasSerializer)
    @action(detail=True, methods=["post"])
    def move(self, request: Request, name: str) -> Response:
        """Point the alias at another version (created on first use)."""
        if name == CHAMPION_ALIAS:
            raise PermissionDenied("the champion alias moves only when an officer approves an approval request")
        serializer = AliasMoveSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        alias = move_alias(name=name, version=serializer.validated_data["version"], actor=Actor.of_request(request))
        return Response(AliasSerializer(self.get_queryset().get(pk=alias.pk)).data)
