"""App configuration for apps.governance."""

from django.apps import AppConfig


class GovernanceConfig(AppConfig):
    name = "apps.governance"
    label = "governance"
    verbose_name = "Governance"

    def ready(self) -> None:
        # Evidence sinks follow state changes through the audit signal (apps/governance/signals.py).
        from apps.governance.datahub import enqueue_datahub_sync
        from apps.governance.mlflow_sync import enqueue_mlflow_sync
        from apps.governance.signals import audit_recorded

        audit_recorded.connect(enqueue_datahub_sync, dispatch_uid="governance.datahub")
        audit_recorded.connect(enqueue_mlflow_sync, dispatch_uid="governance.mlflow")
