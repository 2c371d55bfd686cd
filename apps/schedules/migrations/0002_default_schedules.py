"""The outer loop's default schedules, created once as django-celery-beat PeriodicTask rows.

A data migration rather than a post_migrate hook: it runs once per database, so a schedule an operator edited,
disabled or deleted in the admin stays that way across later migrations (a hook run on every migrate would bring it
back or overwrite it). The task names are those apps/schedules/services.py declares; a migration keeps its own copy,
as migrations must not change meaning when code moves.

- aggregation-deadlines (enabled): every 5 s, the windows whose deadline passed get their aggregation task, as the
  ingest loop's poll did before. Its messages expire after 30 s, so a stopped worker does not find a backlog.
- core-update-nightly (disabled): a core update needs Tier-1 datasets, which only the operator can name in its kwargs.
- champion-evaluation-nightly (disabled): it scores the champion and its lineage on every held-out set (minutes of
  CPU on a real model); enabled once the held-out sets are in place.
"""

import json

from django.apps.registry import Apps
from django.db import migrations
from django.db.backends.base.schema import BaseDatabaseSchemaEditor

DEFAULTS = (
    {
        "name": "aggregation-deadlines",
        "task": "workers.schedules.close_due_windows_task",
        "interval": 5,
        "enabled": True,
        "expire_seconds": 30,
        "description": "Aggregation tasks for windows whose deadline passed or whose awaited candidate was decided; "
        "releases aggregations presumed lost.",
    },
    {
        "name": "core-update-nightly",
        "task": "workers.schedules.start_core_update_task",
        "crontab": "0 2",
        "enabled": False,
        "expire_seconds": 3600,
        "description": "A core_update task of the champion; its kwargs are the task's params (datasets, DeepSpeed "
        "config, steps), checked when it fires. Disabled until the operator names the Tier-1 datasets.",
    },
    {
        "name": "champion-evaluation-nightly",
        "task": "workers.schedules.evaluate_champion_task",
        "crontab": "0 3",
        "enabled": False,
        "expire_seconds": 3600,
        "description": "An evaluation task of the version the champion alias points to; its kwargs are the "
        "evaluation's other params (heldout_dir, seq_len).",
    },
)


def create_defaults(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
    CrontabSchedule = apps.get_model("django_celery_beat", "CrontabSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    for default in DEFAULTS:
        if PeriodicTask.objects.filter(name=default["name"]).exists():
            continue
        schedule = {}
        if "interval" in default:
            schedule["interval"], _ = IntervalSchedule.objects.get_or_create(every=default["interval"], period="seconds")
        else:
            minute, hour = str(default["crontab"]).split()
            schedule["crontab"], _ = CrontabSchedule.objects.get_or_create(
                minute=minute, hour=hour, day_of_week="*", day_of_month="*", month_of_year="*", timezone="UTC"
            )
        PeriodicTask.objects.create(
            name=default["name"],
            task=default["task"],
            enabled=default["enabled"],
            expire_seconds=default["expire_seconds"],
            description=default["description"],
            args=json.dumps([]),
            kwargs=json.dumps({}),
            **schedule,
        )


def remove_defaults(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    PeriodicTask.objects.filter(name__in=[default["name"] for default in DEFAULTS]).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("schedules", "0001_outcome"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(create_defaults, remove_defaults)]
