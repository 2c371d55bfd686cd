"""DEBUG is off unless asked for, and the signing key is the deployment's own: no public fallback, a random one made
once in the zero-setup embedded mode. Settings are read once per process, so these load them in a child process."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from controlplane.settings import embedded_secret_key, is_embedded_database

REPO = Path(__file__).resolve().parents[2]
SHOW = "from django.conf import settings; print(settings.DEBUG, len(settings.SECRET_KEY))"


def load_settings(**env: str | None) -> subprocess.CompletedProcess[str]:
    """Load controlplane.settings in a fresh interpreter with `env` over this one's (None removes a variable)."""
    child = {**os.environ, "DJANGO_SETTINGS_MODULE": "controlplane.settings", "PYTHONPATH": str(REPO)}
    for name, value in env.items():
        if value is None:
            child.pop(name, None)
        else:
            child[name] = value
    return subprocess.run(
        [sys.executable, "-c", SHOW], cwd=REPO, env=child, capture_output=True, text=True, timeout=120, check=False
    )


def test_debug_is_off_unless_explicitly_on() -> None:
    unset = load_settings(DEBUG=None, SECRET_KEY="k" * 50)
    assert unset.returncode == 0, unset.stderr[-2000:]
    assert unset.stdout.split()[0] == "False"
    on = load_settings(DEBUG="true", SECRET_KEY="k" * 50)
    assert on.stdout.split()[0] == "True", on.stderr[-2000:]


def test_a_database_server_without_a_secret_key_is_a_configuration_error() -> None:
    loaded = load_settings(SECRET_KEY=None, SECRET_KEY_FILE=None, DATABASE_URL="postgres://fed@db.internal:5432/fed")
    assert loaded.returncode != 0
    assert "ImproperlyConfigured: SECRET_KEY (or SECRET_KEY_FILE) must be set when DATABASE_URL names" in loaded.stderr
    # Debug mode changes nothing: there is no key to fall back to.
    debug = load_settings(
        SECRET_KEY=None, SECRET_KEY_FILE=None, DEBUG="true", DATABASE_URL="postgres://fed@db.internal:5432/fed"
    )
    assert debug.returncode != 0
    assert "must be set when DATABASE_URL names" in debug.stderr


def test_an_empty_secret_key_file_is_a_configuration_error(tmp_path: Path) -> None:
    empty = tmp_path / "secret"
    empty.write_text("\n", encoding="utf-8")
    loaded = load_settings(SECRET_KEY=None, SECRET_KEY_FILE=str(empty), DATABASE_URL=None)
    assert loaded.returncode != 0
    assert f"SECRET_KEY_FILE={str(empty)!r} is empty" in loaded.stderr


def test_the_secret_key_file_is_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s" * 64 + "\n", encoding="utf-8")
    loaded = load_settings(SECRET_KEY=None, SECRET_KEY_FILE=str(secret), DATABASE_URL="postgres://fed@db:5432/fed")
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == ["False", "64"]


@pytest.mark.parametrize(
    ("url", "embedded"),
    [
        ("", True),
        ("sqlite:///var/demo/db.sqlite3", True),
        ("postgres://fed@db:5432/fed", False),
        ("pgsql://x/y", False),
    ],
)
def test_only_sqlite_or_no_database_url_is_the_embedded_mode(url: str, embedded: bool) -> None:
    assert is_embedded_database(url) is embedded


def test_the_embedded_key_is_random_private_and_made_once(tmp_path: Path) -> None:
    path = tmp_path / "var" / "secret_key"
    first = embedded_secret_key(path)
    assert len(first) >= 50
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert embedded_secret_key(path) == first  # every later process reads the same key
    assert embedded_secret_key(tmp_path / "other" / "secret_key") != first
    assert [p.name for p in path.parent.iterdir()] == ["secret_key"]  # no staging file left behind


def test_an_embedded_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret_key"
    path.write_text("x" * 64, encoding="ascii")
    path.chmod(0o644)
    with pytest.raises(ImproperlyConfigured, match=r"readable by others \(mode 644\): chmod 600"):
        embedded_secret_key(path)


def test_embedded_mode_settings_make_and_reuse_var_secret_key(tmp_path: Path) -> None:
    """With no DATABASE_URL nor SECRET_KEY the settings load (make demo needs no setup) with the key file's key."""
    first = load_settings(SECRET_KEY=None, SECRET_KEY_FILE=None, DATABASE_URL=None)
    assert first.returncode == 0, first.stderr[-2000:]
    key = (REPO / "var" / "secret_key").read_text(encoding="ascii").strip()
    assert first.stdout.split() == ["False", str(len(key))]
    assert stat.S_IMODE((REPO / "var" / "secret_key").stat().st_mode) == 0o600
