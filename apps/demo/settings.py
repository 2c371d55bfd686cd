"""Settings of the demo's processes: the control plane's own, with SQLite set up for several processes writing one
file (the demo's server, ingest worker and orchestrator). Selected by `demo_environment` via DJANGO_SETTINGS_MODULE."""

from controlplane.settings import *  # noqa: F403  (this module is those settings plus one change)
from controlplane.settings import DATABASES

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["OPTIONS"] = {
        **DATABASES["default"].get("OPTIONS", {}),
        # Take the write lock when a transaction starts: a deferred transaction that read first cannot upgrade
        # once another process has written (SQLite answers "database is locked" at once, whatever the timeout).
        "transaction_mode": "IMMEDIATE",
        # Wait for another process's write instead of failing after SQLite's default 5 s.
        "timeout": 60.0,
        # Readers do not block the writer (and the reverse) with the write-ahead log; persistent in the file.
        "init_command": "PRAGMA journal_mode=WAL;PRAGMA synchronous=NORMAL",
    }
