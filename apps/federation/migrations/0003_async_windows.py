"""Aggregation windows: mode (async default, sync with a cohort), series, candidate and record per round; updates
are recorded once checked (buffered or rejected) with their staleness."""

import django.db.models.deletion
from django.db import migrations, models
from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.migrations.state import StateApps


def name_series(apps: StateApps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    # Every existing round starts its own series.
    Round = apps.get_model("federation", "Round")
    for round_ in Round.objects.all():
        Round.objects.filter(pk=round_.pk).update(series=round_.round_id)


def settle_updates(apps: StateApps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    # received/validated no longer exist: an update is recorded once checked. Unfinished ones were never checked
    # through; they are rejected with that reason rather than silently aggregated.
    Update = apps.get_model("federation", "Update")
    Update.objects.filter(status__in=["received", "validated"]).update(
        status="rejected",
        rejection_code="not_checked",
        rejection_message="recorded before the update path checked every envelope once; resend it",
    )


class Migration(migrations.Migration):
    dependencies = [
        ("federation", "0002_stagedpayload"),
        ("registry", "0002_versionevaluation"),
    ]

    operations = [
        migrations.AddField(
            model_name="round",
            name="mode",
            field=models.CharField(
                choices=[("async", "Asynchronous (buffered)"), ("sync", "Synchronous (cohort)")],
                db_index=True,
                default="async",
                max_length=8,
            ),
        ),
        migrations.AddField(
            model_name="round",
            name="series",
            field=models.CharField(
                db_index=True,
                default="",
                help_text="Round id of the first window of an asynchronous series.",
                max_length=64,
            ),
            preserve_default=False,
        ),
        migrations.RunPython(name_series, migrations.RunPython.noop),
        migrations.AddField(
            model_name="round",
            name="sequence",
            field=models.PositiveIntegerField(default=1, help_text="Position of this window in its series."),
        ),
        migrations.AddField(
            model_name="round",
            name="cohort",
            field=models.ManyToManyField(
                blank=True,
                help_text="sync: the devices expected to report.",
                related_name="cohort_rounds",
                to="federation.edgedevice",
            ),
        ),
        migrations.AddField(
            model_name="round",
            name="candidate",
            field=models.ForeignKey(
                blank=True,
                help_text="The candidate this window's aggregation produced.",
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="+",
                to="registry.modelversion",
            ),
        ),
        migrations.AddField(
            model_name="round",
            name="record",
            field=models.JSONField(
                blank=True,
                default=dict,
                help_text="What the aggregation did: trigger, parent, staleness and weights per update, scaling, notes.",
            ),
        ),
        migrations.AlterField(
            model_name="round",
            name="base_version",
            field=models.ForeignKey(
                help_text="sync: the version the cohort trains; async: the champion when the window opened.",
                on_delete=django.db.models.deletion.PROTECT,
                related_name="rounds",
                to="registry.modelversion",
            ),
        ),
        migrations.AddField(
            model_name="update",
            name="staleness",
            field=models.PositiveIntegerField(
                blank=True, help_text="τ: promotions between its base and the champion when last checked.", null=True
            ),
        ),
        migrations.RunPython(settle_updates, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="update",
            name="status",
            field=models.CharField(
                choices=[("rejected", "Rejected"), ("buffered", "Buffered"), ("applied", "Applied")],
                db_index=True,
                max_length=16,
            ),
        ),
    ]
