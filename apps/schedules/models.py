"""What the outer loop's periodic tasks did. The schedules themselves are django-celery-beat's `PeriodicTask` rows
(edited in the admin, read by `celery beat` and by the embedded mode's scheduler thread); this app adds only the
outcome of each one's last run, which beat does not keep."""

from django.db import models
from django_celery_beat.models import PeriodicTask

from apps.federation.models import TrainingTask
from apps.schedules.choices import OutcomeStatus

# An outcome's detail is a summary or an error message: cut here so a long validation report cannot grow a row.
MAX_DETAIL_CHARS = 2000


class ScheduleOutcome(models.Model):
    """The last run of one periodic task: when, whether it acted, and the training task it created (if any).

    One row per periodic task, overwritten by each run: the deadline check fires every few seconds, and a history of
    those would be a table that only grows. The history of what schedules created is in the audit trail
    (`federation.task.created` by the system account) and on the TrainingTask rows.
    """

    periodic_task = models.OneToOneField(
        PeriodicTask, primary_key=True, on_delete=models.CASCADE, related_name="outcome"
    )
    ran_at = models.DateTimeField()
    status = models.CharField(max_length=8, choices=OutcomeStatus.choices)
    detail = models.TextField(blank=True, help_text="What the run did, or what was wrong and what to change.")
    training_task = models.ForeignKey(TrainingTask, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    consecutive_errors = models.PositiveIntegerField(
        default=0, help_text="Runs in a row that ended in an error (0 after a run that acted)."
    )

    class Meta:
        ordering = ("periodic_task__name",)

    def __str__(self) -> str:
        return f"{self.periodic_task.name}: {self.status} at {self.ran_at:%Y-%m-%d %H:%M:%S}"
