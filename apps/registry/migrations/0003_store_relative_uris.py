"""Rows that name a place inside the artifact store by absolute path (file:// URIs, plain paths) or by a relative path
now name it `artifacts://<path relative to the store>`, so the store can move with the database.

Run it while FEDNESTED_ARTIFACT_ROOT names the store the rows were written against. Rows pointing outside that store
are left as they are; `manage.py check_store` reports them. Self-contained on purpose: a migration must do the same
thing whatever the application code becomes.
"""

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from django.conf import settings
from django.db import migrations

PREFIX = "artifacts://"


def store_uri(value: str, root: Path, *, relative_paths: bool) -> str | None:
    """`artifacts://<relative>` for a path or file:// URI inside `root` (and for a relative path when
    `relative_paths`); None for anything else, the root itself included."""
    parts = urlsplit(value)
    if parts.scheme == "file" and parts.netloc in ("", "localhost"):
        path = Path(unquote(parts.path))
    elif parts.scheme == "" and value.startswith("/"):
        path = Path(value)
    elif parts.scheme == "" and value and relative_paths:
        path = root / value
    else:
        return None
    resolved, base = path.resolve(), root.resolve()
    if resolved == base or not resolved.is_relative_to(base):
        return None
    return PREFIX + resolved.relative_to(base).as_posix()


def to_store_relative(apps: Any, schema_editor: Any) -> None:
    root = Path(settings.FEDNESTED_ARTIFACT_ROOT)
    # (model, field, whether a bare relative value is a store path): a held-out value may be a dataset's name.
    columns = (
        (apps.get_model("registry", "ModelVersion"), "artifact_uri", True),
        (apps.get_model("registry", "VersionEvaluation"), "heldout", False),
        (apps.get_model("federation", "StagedPayload"), "uri", True),
        (apps.get_model("federation", "Update"), "payload_uri", True),
    )
    for model, field, relative_paths in columns:
        rows = model.objects.exclude(**{f"{field}__startswith": PREFIX}).exclude(**{field: ""})
        for pk, value in rows.values_list("pk", field).iterator():
            converted = store_uri(value, root, relative_paths=relative_paths)
            if converted is not None and len(converted) <= model._meta.get_field(field).max_length:
                model.objects.filter(pk=pk).update(**{field: converted})


class Migration(migrations.Migration):
    dependencies = [
        ("registry", "0002_versionevaluation"),
        ("federation", "0004_device_keys"),
    ]

    # Backwards: nothing to undo; the code before this migration resolves artifacts:// URIs as well.
    operations = [migrations.RunPython(to_store_relative, migrations.RunPython.noop)]
