"""App configuration for apps.console."""

from django.apps import AppConfig


class ConsoleConfig(AppConfig):
    name = "apps.console"
    label = "console"
    verbose_name = "Web console"

    def ready(self) -> None:
        # The live console follows the audit trail's signal rather than each service (apps/console/live.py).
        from apps.console.live import broadcast_audit_event
        from apps.governance.signals import audit_recorded

        audit_recorded.connect(broadcast_audit_event, dispatch_uid="console-live-broadcast")
