"""The edge part installs and runs without Django: its requirement set names no control-plane package, and every
edge module imports (and the CLI answers) with Django and the control-plane packages made unimportable."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTROL_PLANE_ONLY = ("django", "djangorestframework", "drf-spectacular", "celery", "channels", "daphne", "psycopg")

# Runs in a fresh interpreter: a meta-path finder refuses the control plane's packages, then every edge module is
# imported and the `fednested tier2` CLI asked for its help text, as on a device that never installed them.
BLOCKED_IMPORT_PROBE = """
import importlib, pkgutil, sys
BLOCKED = ("django", "rest_framework", "drf_spectacular", "celery", "channels", "apps", "controlplane", "workers")

class RefuseControlPlane:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed on an edge device")
        return None

sys.meta_path.insert(0, RefuseControlPlane())
import edge_client
# __main__ runs the CLI when imported; the CLI is exercised below instead.
names = [m.name for m in pkgutil.walk_packages(edge_client.__path__, "edge_client.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
from typer.testing import CliRunner
from fednested.cli import app
result = CliRunner().invoke(app, ["tier2", "run-client", "--help"])
assert result.exit_code == 0, result.output
assert "--config" in result.output, result.output
print(len(names), "edge modules imported")
"""


def _requirement_names(path: Path) -> set[str]:
    names: set[str] = set()
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            names |= _requirement_names(path.parent / line[3:].strip())
            continue
        names.add(line.split("==")[0].split("[")[0].strip().lower())
    return names


def test_the_edge_requirement_set_names_no_control_plane_package() -> None:
    names = _requirement_names(ROOT / "requirements" / "edge.txt")
    assert "torch" in names  # the set was really read, -r base.txt included
    assert not names & set(CONTROL_PLANE_ONLY), sorted(names & set(CONTROL_PLANE_ONLY))


def test_every_edge_module_imports_and_the_cli_runs_without_django() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT_PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    imported = int(result.stdout.strip().splitlines()[-1].split()[0])
    assert imported >= 10  # the client's modules: runner, sidecar, spool, transport, snapshots, ...
