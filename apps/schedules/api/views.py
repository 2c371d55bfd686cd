"""REST views of the schedules: the outer loop's periodic tasks, read-only (they are edited in the admin)."""

from typing import ClassVar

from django_celery_beat.models import PeriodicTask
from rest_framework import mixins, viewsets

from apps.accounts.choices import Role
from apps.accounts.permissions import EVERY_ROLE_BUT_DEVICE
from apps.schedules.api.serializers import ScheduleSerializer


class ScheduleViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[PeriodicTask]):
    """The periodic tasks beat fires (aggregation deadlines, core updates, champion evaluations), with each one's
    params and the outcome of its last run; officers and engineers read them."""

    queryset = PeriodicTask.objects.select_related(
        "interval", "crontab", "solar", "clocked", "outcome__training_task"
    ).order_by("name")
    serializer_class = ScheduleSerializer
    action_roles: ClassVar[dict[str, frozenset[Role]]] = {
        "list": EVERY_ROLE_BUT_DEVICE,
        "retrieve": EVERY_ROLE_BUT_DEVICE,
    }
