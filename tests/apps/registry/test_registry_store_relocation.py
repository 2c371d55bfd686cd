"""The embedded control plane's database (SQLite) and artifact store moved together to another path serve every file
byte for byte, and `check_store` passes there; the store moved without its database gives 410s with a code, and
`check_store` lists every file it lacks.

Everything runs in child processes against a database and store of their own (migrated, seeded through the
services, served by `manage.py runserver` as the embedded mode serves), so nothing of the test process's own
database or settings can stand in for the moved copy.
"""

import hashlib
import io
import json
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from apps.demo.environment import SERVICE_VARIABLES
from apps.governance.actors import Actor

pytestmark = pytest.mark.slow

SEED_MARKER = "SEED "
FILE_NAMES = ("core.safetensors", "gate.safetensors", "experts.safetensors", "config.json")


def seed() -> None:
    """In a child process (django set up against DATABASE_URL and FEDNESTED_ARTIFACT_ROOT): a registry as a
    deployment holds one, built through the services; what the test needs to check it is printed as JSON."""
    from django.conf import settings as child_settings

    from apps.accounts.choices import Role
    from apps.accounts.services import create_user_with_role, issue_api_token
    from apps.federation.services import enroll_device, issue_enrollment_token, store_update_payload
    from apps.governance.services import approve_version, request_approval
    from apps.registry.choices import ArtifactPartition
    from apps.registry.services import (
        ArtifactSpec,
        DomainEvaluation,
        create_model_family,
        record_version_evaluation,
        register_version,
    )
    from apps.registry.storage import artifact_root
    from tests.device_keys import device_csr

    generator = random.Random(15)
    partitions = {
        "core.safetensors": ArtifactPartition.CORE,
        "gate.safetensors": ArtifactPartition.GATE,
        "experts.safetensors": ArtifactPartition.EXPERT,
        "config.json": ArtifactPartition.CONFIG,
        "manifest.json": ArtifactPartition.MANIFEST,
    }
    users = {
        role: create_user_with_role(username=f"{role}-1", role=role, actor=Actor.automation("seed"))
        for role in (Role.ENGINEER, Role.OFFICER)
    }
    tokens = {
        role: issue_api_token(user, actor=Actor.automation("seed"), name="seed")[1] for role, user in users.items()
    }
    family = create_model_family(name="tiny-moe", architecture="MixtralForCausalLM", actor=users[Role.ENGINEER])
    files: dict[str, dict[str, str]] = {}
    parent = None
    for version_id, size in (("v1", 1 << 20), ("v2", 300_000)):
        folder = artifact_root() / "versions" / version_id
        folder.mkdir(parents=True)
        contents = {name: generator.randbytes(size // (index + 1) + index) for index, name in enumerate(FILE_NAMES)}
        manifest = {
            "version_id": version_id,
            "files": {name: {"sha256": hashlib.sha256(data).hexdigest()} for name, data in contents.items()},
        }
        contents["manifest.json"] = json.dumps(manifest, indent=2).encode()
        for name, data in contents.items():
            (folder / name).write_bytes(data)
        parent = register_version(
            family=family,
            version_id=version_id,
            manifest=manifest,
            artifacts=[
                ArtifactSpec(name, hashlib.sha256(data).hexdigest(), len(data), partitions[name])
                for name, data in contents.items()
            ],
            artifact_uri=f"artifacts://versions/{version_id}",
            parent=parent,
            actor=users[Role.ENGINEER],
        )
        files[version_id] = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    assert parent is not None
    record_version_evaluation(
        parent,
        [DomainEvaluation(domain="medical", loss=2.5, perplexity=12.2, tokens=640, parent_loss=2.75)],
        actor=Actor.automation("worker:evaluation"),
        heldout="artifacts://heldout",
    )
    champion = parent.parent
    assert champion is not None
    approve_version(request_approval(champion, actor=users[Role.ENGINEER]), actor=users[Role.OFFICER])
    _, enrollment_token = issue_enrollment_token(actor=users[Role.ENGINEER], note="car-0001")
    enrollment = enroll_device(
        token=enrollment_token, client_id="car-0001", csr=device_csr("car-0001"), domain="automotive"
    )
    raw = generator.randbytes(50_000)
    receipt = store_update_payload(
        enrollment.device,
        str(uuid.uuid4()),
        io.BytesIO(raw),
        declared_sha256=hashlib.sha256(raw).hexdigest(),
        content_length=len(raw),
        max_bytes=child_settings.FEDNESTED_MAX_UPDATE_BYTES,
        root=artifact_root(),
    )
    tokens["device"] = enrollment.api_token
    payload = {"uri": receipt.uri, "sha256": receipt.sha256}
    print(SEED_MARKER + json.dumps({"tokens": tokens, "files": files, "payload": payload}))


def environment(database: Path, store: Path) -> dict[str, str]:
    """The embedded mode (SQLite, embedded bus) on `database` and `store`; no service of the test run."""
    env = {key: value for key, value in os.environ.items() if key not in SERVICE_VARIABLES}
    return env | {
        "DATABASE_URL": f"sqlite:///{database}",
        "FEDNESTED_ARTIFACT_ROOT": str(store),
        "FEDNESTED_BUS": "embedded",
        "FEDNESTED_BUS_PATH": str(database.parent / "bus.sqlite3"),
        "DJANGO_SETTINGS_MODULE": "controlplane.settings",
        "PYTHONPATH": str(settings.BASE_DIR),
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(Path(settings.BASE_DIR) / "manage.py"), *args],
        env=env,
        cwd=settings.BASE_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def control_plane(env: dict[str, str], log: Path) -> Iterator[str]:
    """`manage.py runserver` on `env` (as the embedded mode serves); yields its base URL once it answers."""
    port = free_port()
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                str(Path(settings.BASE_DIR) / "manage.py"),
                "runserver",
                "--noreload",
                f"127.0.0.1:{port}",
            ],
            env=env,
            cwd=settings.BASE_DIR,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"the control plane exited: {log.read_text()[-2000:]}"
            try:
                urllib.request.urlopen(f"{url}/api/v1/me/", timeout=2)
            except urllib.error.HTTPError:
                break  # it answers (401 without a token)
            except OSError:
                assert time.monotonic() < deadline, f"the control plane did not answer: {log.read_text()[-2000:]}"
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def get(url: str, token: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Token {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A migrated, seeded embedded deployment moved to another path: (its new folder, what the seed printed).

    The database is copied with SQLite's backup API (consistent while the server runs), the store as files, and the
    original folder is deleted, so nothing can still be read from where the rows were written.
    """
    base = tmp_path_factory.mktemp("relocation")
    old = base / "old"
    (old / "artifacts").mkdir(parents=True)
    env = environment(old / "db.sqlite3", old / "artifacts")
    migrated = manage(env, "migrate", "--noinput")
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    child = subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); from " + __name__ + " import seed; seed()"],
        env=env,
        cwd=settings.BASE_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    [line] = [line for line in child.stdout.splitlines() if line.startswith(SEED_MARKER)]
    new = base / "moved" / "elsewhere"
    (new / "artifacts").parent.mkdir(parents=True)
    with sqlite3.connect(old / "db.sqlite3") as source, sqlite3.connect(new / "db.sqlite3") as target:
        source.backup(target)
    shutil.copytree(old / "artifacts", new / "artifacts")
    shutil.rmtree(old)
    return new, json.loads(line.removeprefix(SEED_MARKER))


def test_the_moved_deployment_serves_every_file_byte_for_byte(
    deployment: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    new, seeded = deployment
    tokens, files = seeded["tokens"], seeded["files"]
    with control_plane(environment(new / "db.sqlite3", new / "artifacts"), tmp_path / "server.log") as url:
        status, body = get(f"{url}/api/v1/versions/", tokens["engineer"])
        assert status == 200, body[:500]
        listed = {version["version_id"]: version for version in json.loads(body)["results"]}
        assert {vid: version["artifact_uri"] for vid, version in listed.items()} == {
            "v1": "artifacts://versions/v1",
            "v2": "artifacts://versions/v2",
        }
        downloads = 0
        for version_id, version in listed.items():
            assert {entry["file_name"]: entry["sha256"] for entry in version["artifacts"]} == files[version_id]
            for name, sha256 in files[version_id].items():
                status, content = get(f"{url}/api/v1/versions/{version_id}/files/{name}/", tokens["engineer"])
                assert status == 200, content[:500]
                assert content == (new / "artifacts" / "versions" / version_id / name).read_bytes()
                assert hashlib.sha256(content).hexdigest() == sha256
                downloads += 1
        assert downloads == 10
        # A device pulls the champion as it always does.
        status, body = get(f"{url}/api/v1/aliases/champion/", tokens["device"])
        assert (status, json.loads(body)["version"]["version_id"]) == (200, "v1")
        for name, sha256 in files["v1"].items():
            status, content = get(f"{url}/api/v1/versions/v1/files/{name}/", tokens["device"])
            assert (status, hashlib.sha256(content).hexdigest()) == (200, sha256)
        status, body = get(f"{url}/api/v1/versions/v2/evaluations/", tokens["officer"])
        assert (status, json.loads(body)[0]["heldout"]) == (200, "artifacts://heldout")
    checked = manage(environment(new / "db.sqlite3", new / "artifacts"), "check_store")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.splitlines()[-1].endswith("in " + str(new / "artifacts") + ": 0 errors, 0 warnings")


def test_the_store_moved_without_its_database_is_gone_not_a_server_error(
    deployment: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    new, seeded = deployment
    empty = tmp_path / "mounted-empty"
    empty.mkdir()
    env = environment(new / "db.sqlite3", empty)
    with control_plane(env, tmp_path / "server.log") as url:
        for role, version_id in (("device", "v1"), ("engineer", "v2")):
            status, body = get(f"{url}/api/v1/versions/{version_id}/files/core.safetensors/", seeded["tokens"][role])
            assert status == 410, body[:500]
            assert json.loads(body) == {
                "detail": f"file 'core.safetensors' of version '{version_id}' is registered but the artifact store "
                f"holds no versions/{version_id}/core.safetensors",
                "code": "artifact_unavailable",
            }
            assert str(empty).encode() not in body
    checked = manage(env, "check_store")
    assert checked.returncode == 1
    missing = [line for line in checked.stdout.splitlines() if line.startswith("error   not_in_store ")]
    expected = {f"versions/{vid}/{name}" for vid, names in seeded["files"].items() for name in names}
    expected.add(seeded["payload"]["uri"].removeprefix("artifacts://"))
    assert {line.split(": ", 1)[1] for line in missing} == expected
    assert "11 errors" in checked.stderr
