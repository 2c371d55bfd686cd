"""REST views of the data engine: signals and triggers are read by every role but devices; rules are listed alike
and created or changed by engineers (admins may do everything), through `save_rule`."""

from typing import Any, ClassVar

from rest_framework import mixins, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response

from apps.accounts.choices import Role
from apps.accounts.permissions import EVERY_ROLE_BUT_DEVICE
from apps.dataengine.api.filtersets import DataEngineRuleFilterSet, DataEngineTriggerFilterSet, DeviceSignalFilterSet
from apps.dataengine.api.serializers import (
    DataEngineRuleSerializer,
    DataEngineTriggerSerializer,
    DeviceSignalSerializer,
)
from apps.dataengine.models import DataEngineRule, DataEngineTrigger, DeviceSignal
from apps.dataengine.services import save_rule
from apps.governance.actors import Actor

ENGINEER = frozenset({Role.ENGINEER})


class DeviceSignalViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[DeviceSignal]):
    """Per-device, per-domain signals from telemetry.edge, newest first."""

    queryset = DeviceSignal.objects.all()
    serializer_class = DeviceSignalSerializer
    filterset_class = DeviceSignalFilterSet
    action_roles: ClassVar[dict[str, frozenset[Role]]] = {
        "list": EVERY_ROLE_BUT_DEVICE,
        "retrieve": EVERY_ROLE_BUT_DEVICE,
    }


class DataEngineRuleViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet[DataEngineRule],
):
    """The rules that turn signals into training tasks; engineers create and change them (audited)."""

    queryset = DataEngineRule.objects.all()
    serializer_class = DataEngineRuleSerializer
    filterset_class = DataEngineRuleFilterSet
    action_roles: ClassVar[dict[str, frozenset[Role]]] = {
        "list": EVERY_ROLE_BUT_DEVICE,
        "retrieve": EVERY_ROLE_BUT_DEVICE,
        "create": ENGINEER,
        "update": ENGINEER,
        "partial_update": ENGINEER,
    }

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        rule = save_rule(actor=Actor.of_request(request), **serializer.validated_data)
        return Response(DataEngineRuleSerializer(rule).data, status=status.HTTP_201_CREATED)

    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        rule = self.get_object()
        serializer = self.get_serializer(rule, data=request.data, partial=kwargs.get("partial", False))
        serializer.is_valid(raise_exception=True)
        rule = save_rule(actor=Actor.of_request(request), rule=rule, **serializer.validated_data)
        return Response(DataEngineRuleSerializer(rule).data)


class DataEngineTriggerViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[DataEngineTrigger]
):
    """Rules that fired: their evidence, the TrainingTask event published, and the task created (or the refusal)."""

    queryset = DataEngineTrigger.objects.select_related("rule", "training_task").all()
    serializer_class = DataEngineTriggerSerializer
    filterset_class = DataEngineTriggerFilterSet
    action_roles: ClassVar[dict[str, frozenset[Role]]] = {
        "list": EVERY_ROLE_BUT_DEVICE,
        "retrieve": EVERY_ROLE_BUT_DEVICE,
    }
