"""Where the demo keeps its state (var/demo/, wiped at each start) and the environment that selects the embedded
mode for it and every process it starts: SQLite, the embedded bus, broker-less Celery."""

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Set in the demo's own environment; its presence means "the settings were loaded for var/demo already".
DEMO_DIR_VARIABLE = "FEDNESTED_DEMO_DIR"
# Variables that would point the demo at real services; the demo runs without any of them.
SERVICE_VARIABLES = (
    "DATABASE_URL",
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "FEDNESTED_KAFKA_BOOTSTRAP",
    "FEDNESTED_TOPIC_PREFIX",
    "FEDNESTED_REQUIRE_SERVICES",
)
# The demo's Fisher: on the held-out sets of the domains its gate protects (the domains no device trains on), a
# few thousand tokens (about two seconds of the tiny model per version).
DEMO_FISHER = '{"domains": "protected", "max_tokens": 4096, "seq_len": 128}'
# The control plane's own settings: their SQLite set-up already serves several writing processes.
DEMO_SETTINGS_MODULE = "controlplane.settings"


@dataclass(frozen=True)
class DemoPaths:
    """Every file the demo writes lies under `root`."""

    root: Path

    @property
    def database(self) -> Path:
        return self.root / "db.sqlite3"

    @property
    def bus(self) -> Path:
        return self.root / "bus.sqlite3"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def devices(self) -> Path:
        return self.root / "devices"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def static(self) -> Path:
        return self.root / "static"

    @property
    def mlflow(self) -> Path:
        """The MLflow store the relay mirrors the demo's runs and versions into (SQLite file and artifacts)."""
        return self.root / "mlflow"

    @property
    def audit_anchors(self) -> Path:
        """The audit chain's anchors: inside the demo folder, so they go with the database it recreates each run."""
        return self.root / "audit-anchors.jsonl"

    @property
    def promotion_gate(self) -> Path:
        """The demo federation's gate thresholds (written by the demo once it knows which domains are protected)."""
        return self.root / "promotion-gate.json"


def database_url(path: Path) -> str:
    return f"sqlite:///{path}"


def demo_environment(base: Mapping[str, str], paths: DemoPaths) -> dict[str, str]:
    """`base` with the service variables removed and the embedded mode pointed at `paths`."""
    env = {key: value for key, value in base.items() if key not in SERVICE_VARIABLES}
    env.update(
        {
            DEMO_DIR_VARIABLE: str(paths.root),
            "DJANGO_SETTINGS_MODULE": DEMO_SETTINGS_MODULE,
            "DATABASE_URL": database_url(paths.database),
            "FEDNESTED_BUS": "embedded",
            "FEDNESTED_BUS_PATH": str(paths.bus),
            "FEDNESTED_ARTIFACT_ROOT": str(paths.artifacts),
            "STATIC_ROOT": str(paths.static),
            "FEDNESTED_PROMOTION_GATE": str(paths.promotion_gate),
            "FEDNESTED_AUDIT_ANCHOR_FILE": str(paths.audit_anchors),
            # Every version ships the Fisher of its weights on the gate's protected domains, for the rounds' EWC.
            "FEDNESTED_FISHER": DEMO_FISHER,
            # The relay mirrors the demo's jobs and versions into an MLflow store of its own (docs/mlflow.md), wiped
            # with the database whose task and version ids it is keyed by; unless the caller turned the mirror off.
            "FEDNESTED_MLFLOW_TRACKING_URI": (
                "off"
                if base.get("FEDNESTED_MLFLOW_TRACKING_URI") == "off"
                else f"sqlite:///{paths.mlflow / 'mlflow.db'}"
            ),
            # The DataHub lineage file (docs/datahub.md) goes with the database whose version and task ids it names.
            "FEDNESTED_DATAHUB_FILE": str(paths.root / "datahub-metadata.json"),
            # The demo prints its own progress; INFO lines of Celery and the workers go to their logs only.
            "LOG_LEVEL": base.get("LOG_LEVEL", "WARNING"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def running_in_demo_environment(paths: DemoPaths) -> bool:
    """True in the process that `demo` re-executed with `demo_environment` (its settings point at var/demo)."""
    return os.environ.get(DEMO_DIR_VARIABLE) == str(paths.root)
