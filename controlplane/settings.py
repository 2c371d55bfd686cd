"""Django settings for the fednested control plane: one module, every deployment choice read from the environment.

Unset variables give the embedded single-machine mode (`make demo`): SQLite, in-memory channel layer, jobs in a thread,
embedded event bus, artifacts under var/. Deployments and CI set DATABASE_URL, REDIS_URL, CELERY_BROKER_URL and
FEDNESTED_BUS=kafka.
"""

import hashlib
import ipaddress
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

from fednested.governance.pii import PiiConfigError
from fednested.governance.pii import load_config as load_pii_config
from fednested.observability.logs import LOG_FORMATS, logging_config
from fednested.observability.tracing import TracingSetupError, check_endpoint

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

_TRUE_WORDS = {"1", "true", "yes", "on"}
_FALSE_WORDS = {"0", "false", "no", "off"}


def envstr(name: str, default: str) -> str:
    """The variable `name`, or the stripped contents of the file named by `name_FILE` (Docker/K8s secrets)."""
    file_path = os.environ.get(f"{name}_FILE")
    if file_path:
        try:
            return Path(file_path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE={file_path!r} cannot be read: {exc}") from exc
    return os.environ.get(name, default)


def envbool(name: str, default: bool) -> bool:
    raw = envstr(name, "").strip().lower()
    if raw == "":
        return default
    if raw in _TRUE_WORDS:
        return True
    if raw in _FALSE_WORDS:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean: use one of {sorted(_TRUE_WORDS | _FALSE_WORDS)}")


def envint(name: str, default: int) -> int:
    raw = envstr(name, "").strip()
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from exc


def envlist(name: str, default: str) -> list[str]:
    return [item.strip() for item in envstr(name, default).split(",") if item.strip()]


def database_from_url(url: str) -> dict[str, Any]:
    """Django DATABASES entry for `postgres://user:pass@host:port/name?opt=v` or `sqlite:///path` (`sqlite://:memory:`).

    PostgreSQL goes through psycopg 3 (Django's postgresql backend picks it when installed).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in {"postgres", "postgresql", "pgsql"}:
        name = unquote(parts.path.lstrip("/"))
        if not name:
            raise ImproperlyConfigured(f"DATABASE_URL {url!r} names no database: expected postgres://…/<name>")
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": unquote(parts.hostname or ""),
            "PORT": str(parts.port or ""),
            "OPTIONS": dict(parse_qsl(parts.query)),
            "CONN_MAX_AGE": 0,
        }
    if scheme == "sqlite":
        # sqlite:///relative/path, sqlite:////absolute/path, sqlite://:memory:
        if parts.netloc == ":memory:" or parts.path in {"", "/", "/:memory:"}:
            return {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": unquote(parts.path[1:]),
            # The embedded mode runs several processes on one file (server, ingest worker, demo orchestrator):
            # take the write lock when a transaction starts (a deferred one that read first cannot upgrade once
            # another process wrote: "database is locked" at once, whatever the timeout), wait for other writers
            # instead of failing after 5 s, and let readers and the writer proceed together (write-ahead log).
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": 60.0,
                "init_command": "PRAGMA journal_mode=WAL;PRAGMA synchronous=NORMAL",
            },
        }
    raise ImproperlyConfigured(f"DATABASE_URL scheme {scheme!r} is not supported: use postgres:// or sqlite://")


def is_embedded_database(url: str) -> bool:
    """True for the zero-setup single-machine mode: no DATABASE_URL, or an SQLite one (what `make demo` sets)."""
    return urlsplit(url).scheme.lower() in {"", "sqlite"}


def embedded_secret_key(path: Path) -> str:
    """The embedded mode's signing key: random, made once into `path` (mode 0600) and read back by every process.

    Made under a temporary name and linked into place, so processes starting together agree on one key.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="ascii") as handle:
            handle.write(secrets.token_urlsafe(48))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(staging, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            staging.unlink()
    mode = path.stat().st_mode
    if mode & 0o077:
        raise ImproperlyConfigured(
            f"{path} holds the signing key but is readable by others (mode {mode & 0o777:o}): chmod 600 {path}"
        )
    key = path.read_text(encoding="ascii").strip()
    if not key:
        raise ImproperlyConfigured(f"{path} is empty: delete it to have a new signing key made")
    return key


# --- core ----------------------------------------------------------------------------------------------------------

# Off unless asked for (DEBUG=true): debug error pages list every URL and show settings to whoever triggers them.
DEBUG = envbool("DEBUG", False)
SECRET_KEY = envstr("SECRET_KEY", "")
if not SECRET_KEY:
    if os.environ.get("SECRET_KEY_FILE"):
        raise ImproperlyConfigured(f"SECRET_KEY_FILE={os.environ['SECRET_KEY_FILE']!r} is empty")
    if not is_embedded_database(envstr("DATABASE_URL", "")):
        raise ImproperlyConfigured(
            "SECRET_KEY (or SECRET_KEY_FILE) must be set when DATABASE_URL names a database server: every process "
            "of the deployment must sign with the same key (e.g. SECRET_KEY=$(openssl rand -base64 48))"
        )
    SECRET_KEY = embedded_secret_key(VAR_DIR / "secret_key")
ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    # daphne first: its runserver serves the ASGI application (HTTP + websockets).
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "django_celery_beat",
    "apps.accounts",
    "apps.registry",
    "apps.federation",
    "apps.governance",
    "apps.console",
    "apps.demo",
    "apps.outbox",
    "apps.dataengine",
    "apps.schedules",
]

MIDDLEWARE = [
    # First, so a request's measured time includes every other middleware (controlplane/metrics/web.py).
    "controlplane.metrics.web.RequestMetricsMiddleware",
    # Names the request in its log lines, its span and its response (X-Request-ID).
    "controlplane.observability.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "controlplane.urls"
WSGI_APPLICATION = "controlplane.wsgi.application"
ASGI_APPLICATION = "controlplane.asgi.application"
AUTH_USER_MODEL = "accounts.User"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- database ------------------------------------------------------------------------------------------------------

_DEFAULT_SQLITE = VAR_DIR / "db.sqlite3"
DATABASES = {"default": database_from_url(envstr("DATABASE_URL", f"sqlite:///{_DEFAULT_SQLITE}"))}
if DATABASES["default"]["NAME"] == str(_DEFAULT_SQLITE):
    # SQLite cannot create the folder of its file, and var/ is not in the checkout.
    VAR_DIR.mkdir(exist_ok=True)
# Test runs on one shared PostgreSQL server clash on Django's default `test_<name>`; each run may pick its own.
FEDNESTED_TEST_DB_NAME = envstr("FEDNESTED_TEST_DB_NAME", "").strip()
if FEDNESTED_TEST_DB_NAME:
    DATABASES["default"]["TEST"] = {"NAME": FEDNESTED_TEST_DB_NAME}
# Connections per server process kept open in a pool (psycopg_pool; 0: none, a connection per request). Under ASGI
# every request runs its view in a thread of its own, so CONN_MAX_AGE cannot keep a connection between requests;
# without a pool each request pays a PostgreSQL connection (a backend fork and a SCRAM exchange, several ms of CPU).
# The production server sets it (docs/operations/serving.md); a request waits for a free connection up to 10 s.
FEDNESTED_DB_POOL_SIZE = envint("FEDNESTED_DB_POOL_SIZE", 0)
if FEDNESTED_DB_POOL_SIZE < 0:
    raise ImproperlyConfigured(f"FEDNESTED_DB_POOL_SIZE={FEDNESTED_DB_POOL_SIZE} must be >= 0 (0: no pool)")
if FEDNESTED_DB_POOL_SIZE and DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"]["OPTIONS"]["pool"] = {"min_size": 1, "max_size": FEDNESTED_DB_POOL_SIZE, "timeout": 10.0}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(envstr("STATIC_ROOT", str(VAR_DIR / "static")))
STATICFILES_DIRS = [BASE_DIR / "static"]

# The web console's sign-in page (apps/console/urls.py); the browsable API signs in there too.
LOGIN_URL = "console:sign-in"
# A form post without a valid CSRF token (a forged post) is refused, and audited (apps.accounts.refusals), with a
# console page that says what to do.
CSRF_FAILURE_VIEW = "apps.console.views.csrf_failure"

# --- channels (websockets) -----------------------------------------------------------------------------------------

REDIS_URL = envstr("REDIS_URL", "")
# channels_redis waits for a socket's next message with a blocking pop of 5 s; redis-py 8 times a socket read out
# after 5 s by default, so the two race and a consumer dies with "Timeout reading" while it waits. Reads get longer.
CHANNEL_REDIS_SOCKET_TIMEOUT_S = 15
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": CHANNEL_REDIS_SOCKET_TIMEOUT_S}]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- Celery --------------------------------------------------------------------------------------------------------

# Without CELERY_BROKER_URL there is no broker to talk to: jobs run in a thread of the process that starts them,
# after the starting transaction commits (apps/federation/jobs.py), so the demo needs no Redis and no request waits
# on a job. With a broker they go to their queue.
CELERY_BROKER_URL = envstr("CELERY_BROKER_URL", "")
FEDNESTED_JOBS_IN_PROCESS = not CELERY_BROKER_URL
# The database holds job state (TrainingTask.status); the Celery result backend is not used.
CELERY_TASK_IGNORE_RESULT = True
# … so no `celery.backend_cleanup` schedule either (beat installs one whenever results expire).
CELERY_RESULT_EXPIRES = None
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# The outer loop's schedule is django-celery-beat's PeriodicTask table (apps/schedules, editable in the admin):
# `celery -A controlplane beat` reads it; in the embedded mode the ingest worker's schedule thread does.
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"

# --- fednested -----------------------------------------------------------------------------------------------------

FEDNESTED_BUS = envstr("FEDNESTED_BUS", "embedded")
if FEDNESTED_BUS not in {"embedded", "kafka"}:
    raise ImproperlyConfigured(f"FEDNESTED_BUS={FEDNESTED_BUS!r} is not supported: use 'embedded' or 'kafka'")
FEDNESTED_BUS_PATH = Path(envstr("FEDNESTED_BUS_PATH", str(VAR_DIR / "bus.sqlite3")))
FEDNESTED_KAFKA_BOOTSTRAP = envstr("FEDNESTED_KAFKA_BOOTSTRAP", "")
if FEDNESTED_BUS == "kafka" and not FEDNESTED_KAFKA_BOOTSTRAP:
    raise ImproperlyConfigured("FEDNESTED_BUS=kafka needs FEDNESTED_KAFKA_BOOTSTRAP (host:port of the brokers)")
# Prepended to every topic name, so deployments (or test runs) can share one broker.
FEDNESTED_TOPIC_PREFIX = envstr("FEDNESTED_TOPIC_PREFIX", "")
FEDNESTED_ARTIFACT_ROOT = Path(envstr("FEDNESTED_ARTIFACT_ROOT", str(VAR_DIR / "artifacts")))
# The audit chain's anchors (apps/governance/chain.py): the chain head appended to this file outside the database, at
# most every FEDNESTED_AUDIT_ANCHOR_INTERVAL seconds while events are sealed (0: only `fednested audit anchor`). The
# default file is named after the database and a digest of where it is (engine, host, port, name), so two databases on
# one checkout never mix their anchors (two SQLite files both called db.sqlite3 did). A database dropped and created
# again starts a new chain: its old anchors must go with it (make demo keeps its anchors in var/demo, which it wipes).
_DATABASE_WHERE = "|".join(str(DATABASES["default"].get(key, "")) for key in ("ENGINE", "HOST", "PORT", "NAME"))
FEDNESTED_AUDIT_ANCHOR_FILE = Path(
    envstr(
        "FEDNESTED_AUDIT_ANCHOR_FILE",
        str(
            VAR_DIR
            / "audit"
            / (
                f"anchors-{Path(str(DATABASES['default']['NAME'])).name or 'default'}-"
                f"{hashlib.sha256(_DATABASE_WHERE.encode()).hexdigest()[:12]}.jsonl"
            )
        ),
    )
)
FEDNESTED_AUDIT_ANCHOR_INTERVAL = envint("FEDNESTED_AUDIT_ANCHOR_INTERVAL", 300)
if FEDNESTED_AUDIT_ANCHOR_INTERVAL < 0:
    raise ImproperlyConfigured("FEDNESTED_AUDIT_ANCHOR_INTERVAL must be >= 0 seconds (0: anchor only on demand)")
# Refused access in the audit trail (apps/accounts/refusals.py, docs/audit-trail.md): at most one event per party and
# reason in this many seconds per process, the refusals in between counted into the next one (0: every refusal).
FEDNESTED_ACCESS_AUDIT_WINDOW = envint("FEDNESTED_ACCESS_AUDIT_WINDOW", 60)
if FEDNESTED_ACCESS_AUDIT_WINDOW < 0:
    raise ImproperlyConfigured("FEDNESTED_ACCESS_AUDIT_WINDOW must be >= 0 seconds (0: record every refusal)")
# DataHub lineage (apps/governance/datahub.py, docs/datahub.md): when enabled, each mirrored change writes an outbox
# row, and the relay appends its metadata change proposals to this JSON file (named after the database, like the
# anchors), or sends them to a DataHub GMS when its URL is set (with the token, if the GMS wants one).
FEDNESTED_DATAHUB_ENABLED = envbool("FEDNESTED_DATAHUB_ENABLED", True)
FEDNESTED_DATAHUB_FILE = Path(
    envstr(
        "FEDNESTED_DATAHUB_FILE",
        str(
            VAR_DIR
            / "datahub"
            / (
                f"metadata-{Path(str(DATABASES['default']['NAME'])).name or 'default'}-"
                f"{hashlib.sha256(_DATABASE_WHERE.encode()).hexdigest()[:12]}.json"
            )
        ),
    )
)
FEDNESTED_DATAHUB_GMS_URL = envstr("FEDNESTED_DATAHUB_GMS_URL", "").strip()
if FEDNESTED_DATAHUB_GMS_URL and urlsplit(FEDNESTED_DATAHUB_GMS_URL).scheme not in {"http", "https"}:
    raise ImproperlyConfigured(f"FEDNESTED_DATAHUB_GMS_URL={FEDNESTED_DATAHUB_GMS_URL!r} must be an http(s) URL")
FEDNESTED_DATAHUB_GMS_TOKEN = envstr("FEDNESTED_DATAHUB_GMS_TOKEN", "").strip()
# PII redaction of stored free text (fednested/governance/pii.py, docs/pii-redaction.md): on by default; `off`, inline
# JSON or a JSON file path for custom entities and limits. Parsed here so a bad value stops start-up.
try:
    FEDNESTED_PII_REDACTION = load_pii_config(envstr("FEDNESTED_PII_REDACTION", "on"), source="FEDNESTED_PII_REDACTION")
except PiiConfigError as error:
    raise ImproperlyConfigured(str(error)) from error
# The promotion gate's thresholds (apps/governance/gate.py): a JSON file, checked whenever it is read; empty: no gate.
FEDNESTED_PROMOTION_GATE = envstr("FEDNESTED_PROMOTION_GATE", "").strip()
# Each new version's Fisher (apps/federation/safeguards.py): JSON {"domains": "protected" | [...], "max_tokens",
# "seq_len", "heldout_dir"}, checked when a version is made; empty: versions ship none (rounds cannot ask for EWC).
FEDNESTED_FISHER = envstr("FEDNESTED_FISHER", "").strip()
# A JSONL of public or synthetic records every new version ships as its replay set; empty: none.
FEDNESTED_REPLAY_SET = envstr("FEDNESTED_REPLAY_SET", "").strip()
# How many earlier champions a candidate's forgetting report compares it with (each may have to be scored again).
FEDNESTED_FORGETTING_LINEAGE_DEPTH = envint("FEDNESTED_FORGETTING_LINEAGE_DEPTH", 10)
if not 1 <= FEDNESTED_FORGETTING_LINEAGE_DEPTH <= 100:
    raise ImproperlyConfigured("FEDNESTED_FORGETTING_LINEAGE_DEPTH must be between 1 and 100")
# The MLflow mirror of jobs and versions (apps/governance/mlflow_sync.py, docs/mlflow.md): MLflow's tracking (and
# registry) URI — a SQLite store under var/ by default (no server: the relay writes it), an http(s):// MLflow server,
# or `off` (no outbox rows written). Runs' artifacts of a local store go to FEDNESTED_MLFLOW_ARTIFACT_ROOT (default:
# beside a SQLite store's file); a server keeps its own. FEDNESTED_MLFLOW_UI_URL is where the version page's links
# point (default: the server's URI; a local store has no UI unless one runs `mlflow ui` on it).
FEDNESTED_MLFLOW_TRACKING_URI = envstr(
    "FEDNESTED_MLFLOW_TRACKING_URI", f"sqlite:///{VAR_DIR / 'mlflow' / 'mlflow.db'}"
).strip()
if FEDNESTED_MLFLOW_TRACKING_URI != "off" and "://" not in FEDNESTED_MLFLOW_TRACKING_URI:
    raise ImproperlyConfigured(
        f"FEDNESTED_MLFLOW_TRACKING_URI={FEDNESTED_MLFLOW_TRACKING_URI!r} is not a URI: use sqlite:////path/mlflow.db, "
        "http(s)://host:port of an MLflow server, or 'off'"
    )
FEDNESTED_MLFLOW_ARTIFACT_ROOT = Path(
    envstr(
        "FEDNESTED_MLFLOW_ARTIFACT_ROOT",
        str(
            Path(FEDNESTED_MLFLOW_TRACKING_URI.removeprefix("sqlite:///")).parent / "artifacts"
            if FEDNESTED_MLFLOW_TRACKING_URI.startswith("sqlite:///")
            else VAR_DIR / "mlflow" / "artifacts"
        ),
    )
)
FEDNESTED_MLFLOW_EXPERIMENT = envstr("FEDNESTED_MLFLOW_EXPERIMENT", "fednested").strip() or "fednested"
FEDNESTED_MLFLOW_UI_URL = envstr(
    "FEDNESTED_MLFLOW_UI_URL",
    FEDNESTED_MLFLOW_TRACKING_URI if FEDNESTED_MLFLOW_TRACKING_URI.startswith(("http://", "https://")) else "",
).strip()
# How long an enrollment token stays valid when the issuer does not say.
FEDNESTED_ENROLLMENT_TOKEN_TTL_S = envint("FEDNESTED_ENROLLMENT_TOKEN_TTL_S", 24 * 3600)
# The outbox relay (workers/relay/) retries a message it could not deliver after base × 2^(attempts-1) seconds,
# never waiting longer than the cap: with the bus down for an hour, the backlog goes out within a cap of its return.
FEDNESTED_OUTBOX_RETRY_BASE_S = envint("FEDNESTED_OUTBOX_RETRY_BASE_S", 1)
FEDNESTED_OUTBOX_RETRY_MAX_S = envint("FEDNESTED_OUTBOX_RETRY_MAX_S", 300)
if not 1 <= FEDNESTED_OUTBOX_RETRY_BASE_S <= FEDNESTED_OUTBOX_RETRY_MAX_S <= 24 * 3600:
    raise ImproperlyConfigured(
        "FEDNESTED_OUTBOX_RETRY_BASE_S and FEDNESTED_OUTBOX_RETRY_MAX_S must satisfy 1 <= base <= max <= 86400"
    )
# Largest update payload a device may upload (PUT /api/v1/updates/<id>/payload/); larger ones get 413. The default
# is the aggregation's own default limit (fednested UpdateLimits.max_bytes), so nothing stored is refused later.
# An aggregation still running after this long is presumed lost (its worker died after claiming the window): the
# ingest worker's periodic check fails its task and reopens the window, so one crash cannot block every window.
FEDNESTED_AGGREGATION_TIMEOUT_S = envint("FEDNESTED_AGGREGATION_TIMEOUT_S", 2 * 3600)
if FEDNESTED_AGGREGATION_TIMEOUT_S <= 0:
    raise ImproperlyConfigured(f"FEDNESTED_AGGREGATION_TIMEOUT_S={FEDNESTED_AGGREGATION_TIMEOUT_S} must be > 0")
# Tier-1 core_update jobs (workers/training.py, docs/tier1.md): each dataset is read only if the Apache Ranger-format
# policy JSON in this file allows the job's service principal (user, groups, roles) to read it. Empty: deny by
# default, so no core_update task can be created or run until an operator names the policies.
FEDNESTED_DATASET_POLICIES = envstr("FEDNESTED_DATASET_POLICIES", "").strip()
FEDNESTED_TIER1_PRINCIPAL = envstr("FEDNESTED_TIER1_PRINCIPAL", "svc-tier1").strip()
if not FEDNESTED_TIER1_PRINCIPAL:
    raise ImproperlyConfigured("FEDNESTED_TIER1_PRINCIPAL must name the Tier-1 jobs' service principal")
FEDNESTED_TIER1_PRINCIPAL_GROUPS = envlist("FEDNESTED_TIER1_PRINCIPAL_GROUPS", "")
FEDNESTED_TIER1_PRINCIPAL_ROLES = envlist("FEDNESTED_TIER1_PRINCIPAL_ROLES", "")
FEDNESTED_MAX_UPDATE_BYTES = envint("FEDNESTED_MAX_UPDATE_BYTES", 64 * 1024 * 1024)
if FEDNESTED_MAX_UPDATE_BYTES <= 0:
    raise ImproperlyConfigured(f"FEDNESTED_MAX_UPDATE_BYTES={FEDNESTED_MAX_UPDATE_BYTES} must be > 0")
# Largest telemetry.edge record the data engine reads (workers/telemetry); a larger one is refused and recorded. A
# report with 64 per-domain entries is about 5 KB.
FEDNESTED_TELEMETRY_MAX_BYTES = envint("FEDNESTED_TELEMETRY_MAX_BYTES", 16 * 1024)
if not 1024 <= FEDNESTED_TELEMETRY_MAX_BYTES <= 1024 * 1024:
    raise ImproperlyConfigured(
        f"FEDNESTED_TELEMETRY_MAX_BYTES={FEDNESTED_TELEMETRY_MAX_BYTES} must be between 1024 and 1048576 bytes"
    )

# --- device identity (docs/operations/identity.md) ---
# The federation's CA directory (`fednested ca init`). Unset: devices still register the public key of their CSR
# and sign updates with it, but get no certificate (the zero-setup embedded mode).
FEDNESTED_CA_DIR = envstr("FEDNESTED_CA_DIR", "").strip()
# Where the CRL is written whenever a certificate is revoked (HAProxy's crl-file); next to the CA by default.
FEDNESTED_CRL_PATH = envstr("FEDNESTED_CRL_PATH", "").strip() or (
    str(Path(FEDNESTED_CA_DIR) / "crl.pem") if FEDNESTED_CA_DIR else ""
)
FEDNESTED_DEVICE_CERT_VALIDITY_S = envint("FEDNESTED_DEVICE_CERT_VALIDITY_S", 7 * 24 * 3600)
if not 60 <= FEDNESTED_DEVICE_CERT_VALIDITY_S <= 90 * 24 * 3600:
    raise ImproperlyConfigured("FEDNESTED_DEVICE_CERT_VALIDITY_S must be between 60 s and 90 days")
# A device whose enrollment answer was lost may repeat it with the same token and key for this long.
FEDNESTED_ENROLLMENT_RETRY_S = envint("FEDNESTED_ENROLLMENT_RETRY_S", 3600)
if not 0 <= FEDNESTED_ENROLLMENT_RETRY_S <= 7 * 24 * 3600:
    raise ImproperlyConfigured("FEDNESTED_ENROLLMENT_RETRY_S must be between 0 and 7 days")
# Replay window of update envelopes (besides the update id, which is accepted once): older or further in the future
# than this is refused. Devices spool updates while offline, hence the generous age.
FEDNESTED_UPDATE_MAX_AGE_S = envint("FEDNESTED_UPDATE_MAX_AGE_S", 30 * 24 * 3600)
FEDNESTED_UPDATE_MAX_CLOCK_SKEW_S = envint("FEDNESTED_UPDATE_MAX_CLOCK_SKEW_S", 300)
if FEDNESTED_UPDATE_MAX_AGE_S <= 0 or not 0 <= FEDNESTED_UPDATE_MAX_CLOCK_SKEW_S <= 24 * 3600:
    raise ImproperlyConfigured("FEDNESTED_UPDATE_MAX_AGE_S must be > 0 and FEDNESTED_UPDATE_MAX_CLOCK_SKEW_S ≤ 1 day")
# The secret HAProxy sends with every request (`fednested infra generate-haproxy-config --proxy-secret-file`): only
# requests carrying it may name a verified client certificate in X-Fednested-Client-* headers. Set it only where
# Django is reachable solely through HAProxy; then X-Forwarded-Proto (set by HAProxy) tells Django the request was
# https, which the console's CSRF origin check needs.
FEDNESTED_PROXY_SECRET = envstr("FEDNESTED_PROXY_SECRET", "").strip()
if FEDNESTED_PROXY_SECRET:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# HAProxy's admin socket (`generate-haproxy-config --admin-socket`): a new CRL is loaded into it at once.
FEDNESTED_HAPROXY_ADMIN_SOCKET = envstr("FEDNESTED_HAPROXY_ADMIN_SOCKET", "").strip()
# Devices must present their client certificate (through HAProxy): a device's API token alone is refused.
FEDNESTED_DEVICES_REQUIRE_CERTIFICATE = envbool("FEDNESTED_DEVICES_REQUIRE_CERTIFICATE", False)
# A heartbeat that reports the version already recorded refreshes last_seen at most once per this many seconds
# (bookkeeping: with hundreds of devices polling, a write per call would be most of the database's work).
FEDNESTED_LAST_SEEN_RESOLUTION_S = envint("FEDNESTED_LAST_SEEN_RESOLUTION_S", 30)
if not 0 <= FEDNESTED_LAST_SEEN_RESOLUTION_S <= 3600:
    raise ImproperlyConfigured("FEDNESTED_LAST_SEEN_RESOLUTION_S must be between 0 and 3600 seconds")
# TLS to Kafka (the SSL listener with client authentication): the CA, and the control plane's client certificate
# and key (principal User:<CN>, e.g. fednested-controlplane; docs/operations/identity.md).
FEDNESTED_KAFKA_SSL_CA = envstr("FEDNESTED_KAFKA_SSL_CA", "").strip()
FEDNESTED_KAFKA_SSL_CERTIFICATE = envstr("FEDNESTED_KAFKA_SSL_CERTIFICATE", "").strip()
FEDNESTED_KAFKA_SSL_KEY = envstr("FEDNESTED_KAFKA_SSL_KEY", "").strip()
if bool(FEDNESTED_KAFKA_SSL_CERTIFICATE) != bool(FEDNESTED_KAFKA_SSL_KEY) or (
    FEDNESTED_KAFKA_SSL_CERTIFICATE and not FEDNESTED_KAFKA_SSL_CA
):
    raise ImproperlyConfigured(
        "FEDNESTED_KAFKA_SSL_CERTIFICATE and FEDNESTED_KAFKA_SSL_KEY go together, and need FEDNESTED_KAFKA_SSL_CA"
    )

# --- metrics (docs/operations/production.md, "Metrics") ---
# Who may read the web server's /metrics: a direct (not proxied) request from these networks, or one presenting
# `Authorization: Bearer <FEDNESTED_METRICS_TOKEN>`. Devices never reach it through HAProxy without the token.
FEDNESTED_METRICS_ALLOWED_NETWORKS = envlist("FEDNESTED_METRICS_ALLOWED_NETWORKS", "127.0.0.1/32,::1/128")
for _network in FEDNESTED_METRICS_ALLOWED_NETWORKS:
    try:
        ipaddress.ip_network(_network)
    except ValueError as _error:
        raise ImproperlyConfigured(f"FEDNESTED_METRICS_ALLOWED_NETWORKS: {_network!r}: {_error}") from _error
FEDNESTED_METRICS_TOKEN = envstr("FEDNESTED_METRICS_TOKEN", "").strip()
# The worker processes' own metrics ports (0: none) and the address they listen on.
FEDNESTED_METRICS_ADDRESS = envstr("FEDNESTED_METRICS_ADDRESS", "127.0.0.1").strip()
FEDNESTED_INGEST_METRICS_PORT = envint("FEDNESTED_INGEST_METRICS_PORT", 0)
FEDNESTED_CELERY_METRICS_PORT = envint("FEDNESTED_CELERY_METRICS_PORT", 0)
if not (0 <= FEDNESTED_INGEST_METRICS_PORT <= 65535 and 0 <= FEDNESTED_CELERY_METRICS_PORT <= 65535):
    raise ImproperlyConfigured("FEDNESTED_INGEST_METRICS_PORT and FEDNESTED_CELERY_METRICS_PORT must be 0…65535")

# --- REST API ------------------------------------------------------------------------------------------------------

# Largest request body anywhere but the payload upload (FEDNESTED_MAX_UPDATE_BYTES): JSON API bodies, console and
# admin forms. The ASGI application refuses larger ones (413) before reading them (controlplane/limits.py), the JSON
# parser reads no more than this whatever the headers say (controlplane/parsers.py), and Django's forms agree.
FEDNESTED_MAX_REQUEST_BYTES = envint("FEDNESTED_MAX_REQUEST_BYTES", 1024 * 1024)
if FEDNESTED_MAX_REQUEST_BYTES <= 0:
    raise ImproperlyConfigured(f"FEDNESTED_MAX_REQUEST_BYTES={FEDNESTED_MAX_REQUEST_BYTES} must be > 0")
DATA_UPLOAD_MAX_MEMORY_SIZE = FEDNESTED_MAX_REQUEST_BYTES

REST_FRAMEWORK = {
    # JSON only: the API takes no forms or files (the payload upload reads its octet-stream body itself), and the
    # browsable API still posts JSON through its raw-data form.
    "DEFAULT_PARSER_CLASSES": ["controlplane.parsers.BoundedJSONParser"],
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    # Token first: its WWW-Authenticate header makes missing credentials a 401 rather than a 403.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # A verified client certificate (passed by HAProxy) decides who a device is before any token is looked at.
        "apps.accounts.authentication.ProxyClientCertificateAuthentication",
        "apps.accounts.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["apps.accounts.permissions.RolePermission"],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": envint("API_PAGE_SIZE", 50),
    # drf-spectacular plus the error responses each operation can return (controlplane/schema.py).
    "DEFAULT_SCHEMA_CLASS": "controlplane.schema.ErrorDocumentingAutoSchema",
    "EXCEPTION_HANDLER": "controlplane.api_errors.exception_handler",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "fednested control plane API",
    "DESCRIPTION": "Model registry, federated rounds, edge enrollment, approvals and audit.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI assets are served from drf-spectacular-sidecar: nothing is fetched from a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "RejectionCodeEnum": "apps.federation.api.serializers.REJECTION_CODE_CHOICES",
        # Two "kind" fields (a task's, a data-engine rule's) and a rule's "task_kind": named by what they are.
        "TaskKindEnum": "apps.federation.choices.TaskKind",
        "RuleKindEnum": "apps.dataengine.choices.RuleKind",
    },
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "controlplane.schema.add_error_components",
    ],
}

# --- observability (docs/operations/observability.md) ---
# Log lines: `json` (one object per line with time, level, logger, message, trace_id, span_id, request_id,
# client_id, round_id, service) for servers, whose logs a collector reads; `text` (the bare message) for people. The
# default follows the mode: json with a database server, text in the embedded mode (`make demo`).
FEDNESTED_LOG_FORMAT = envstr(
    "FEDNESTED_LOG_FORMAT", "text" if is_embedded_database(envstr("DATABASE_URL", "")) else "json"
)
if FEDNESTED_LOG_FORMAT not in LOG_FORMATS:
    raise ImproperlyConfigured(f"FEDNESTED_LOG_FORMAT={FEDNESTED_LOG_FORMAT!r} is not one of {', '.join(LOG_FORMATS)}")
# OTLP/HTTP collector (http(s)://host:4318) that every process sends its spans to; empty: the standard
# OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT variables, and without them spans are made (their ids tie log lines together)
# but sent nowhere.
FEDNESTED_OTLP_ENDPOINT = envstr("FEDNESTED_OTLP_ENDPOINT", "").strip()
if FEDNESTED_OTLP_ENDPOINT:
    try:
        check_endpoint(FEDNESTED_OTLP_ENDPOINT, setting="FEDNESTED_OTLP_ENDPOINT")
    except TracingSetupError as _error:
        raise ImproperlyConfigured(str(_error)) from _error

LOGGING = {
    **logging_config(FEDNESTED_LOG_FORMAT, level=envstr("LOG_LEVEL", "INFO")),
    "loggers": {
        # One line per request: the server's access line (daphne's runserver: `django.channels.server`, with method,
        # path, status and duration). django.request would add a second one for every 4xx ("Not Found: /x"); it
        # keeps only 5xx, whose traceback the access line lacks.
        "django.request": {"level": "ERROR"},
    },
}
# The Celery worker logs through the handler above (JSON or text, with the context fields) instead of its own.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
