from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("federation", "0006_update_content_digest"),
    ]

    operations = [
        migrations.AddField(
            model_name="trainingtask",
            name="policy_decisions",
            field=models.JSONField(
                blank=True,
                default=list,
                help_text="Dataset access decisions of its job (core_update), allowed or denied, each naming the "
                "deciding policy and item (fednested.governance.ranger.Decision.to_json).",
            ),
        ),
    ]
