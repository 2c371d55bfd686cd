"""Serializers of the data engine API; writes of rules go through `apps.dataengine.services.save_rule`."""

from rest_framework import serializers

from apps.dataengine.choices import RuleKind
from apps.dataengine.models import DataEngineRule, DataEngineTrigger, DeviceSignal
from apps.federation.choices import TaskKind
from apps.federation.models import TrainingTask
from controlplane.parsers import StoredJSONField


class DeviceSignalSerializer(serializers.ModelSerializer[DeviceSignal]):
    class Meta:
        model = DeviceSignal
        fields = (
            "id",
            "client_id",
            "domain",
            "loss",
            "tokens",
            "version",
            "round_id",
            "outcome",
            "dp_noised",
            "schema_version",
            "source",
            "reported_at",
            "received_at",
        )
        read_only_fields = fields


class DataEngineRuleSerializer(serializers.ModelSerializer[DataEngineRule]):
    kind = serializers.ChoiceField(choices=RuleKind.choices)
    task_kind = serializers.ChoiceField(choices=TaskKind.choices)
    params = StoredJSONField(required=False, help_text="Kind-specific rule params; see docs/data-engine.md.")
    task_params = StoredJSONField(required=False, help_text="Params of the training task the rule asks for.")
    domain_task_params = StoredJSONField(
        required=False, help_text="domain → params merged over task_params for that domain."
    )

    class Meta:
        model = DataEngineRule
        fields = (
            "id",
            "name",
            "kind",
            "params",
            "enabled",
            "task_kind",
            "task_params",
            "domain_task_params",
            "cooldown_s",
            "created_at",
            "updated_at",
        )
        read_only_fields = ("id", "created_at", "updated_at")


class DataEngineTriggerSerializer(serializers.ModelSerializer[DataEngineTrigger]):
    rule = serializers.SlugRelatedField[DataEngineRule](slug_field="name", read_only=True)
    evidence = serializers.JSONField(read_only=True, help_text="What made the rule fire (signals, computed numbers).")
    task_params = serializers.JSONField(read_only=True)
    training_task = serializers.PrimaryKeyRelatedField[TrainingTask](read_only=True, allow_null=True)

    class Meta:
        model = DataEngineTrigger
        fields = (
            "id",
            "rule",
            "domain",
            "evidence",
            "task_id",
            "task_kind",
            "task_params",
            "status",
            "training_task",
            "refusal",
            "created_at",
        )
        read_only_fields = fields
