"""Enrollment with a one-time token: the credential is stored 0600 and reused; used, expired and unknown tokens,
and a state directory enrolled as another device, fail with an error that says what to do."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from edge_client.enrollment import EnrollmentError, ensure_enrolled
from edge_client.sidecar import AuditLog, Sidecar, example_policy, load_policy
from edge_client.state import StateDir, StateError
from edge_client.transport.http import ControlPlaneClient


def _enroll(tmp_path: Path, plane: Any, token_file: Path, client_id: str = "edge-7") -> Any:
    policy_file = tmp_path / "policy.yaml"
    policy_file.parent.mkdir(parents=True, exist_ok=True)
    policy_file.write_text(yaml.safe_dump(example_policy(plane.url)))
    sidecar = Sidecar(load_policy(policy_file), AuditLog(tmp_path / "state" / "audit.jsonl"))
    with ControlPlaneClient(plane.url, sidecar) as api:
        return ensure_enrolled(StateDir(tmp_path / "state"), api, sidecar, client_id=client_id, token_file=token_file)


def test_enrollment_stores_a_private_credential_and_reuses_it(tmp_path: Path, control_plane: Any) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(control_plane.issue_token() + "\n")
    credential = _enroll(tmp_path, control_plane, token_file)
    assert credential.client_id == "edge-7"
    assert control_plane.api_tokens[credential.api_token] == "edge-7"
    stored = tmp_path / "state" / "credential.json"
    assert stored.stat().st_mode & 0o777 == 0o600
    token_file.unlink()  # the token is no longer needed once enrolled
    again = _enroll(tmp_path, control_plane, token_file)
    assert again == credential
    assert sum(r.path == "/api/v1/enroll/" for r in control_plane.requests) == 1


@pytest.mark.parametrize(
    ("state", "expected"),
    [("used", "was already used"), ("expired", "expired at"), ("unknown", "unknown enrollment token")],
)
def test_refused_tokens_give_a_clear_error_and_store_nothing(
    tmp_path: Path, control_plane: Any, state: str, expected: str
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("fet_not-issued" if state == "unknown" else control_plane.issue_token(state))
    with pytest.raises(EnrollmentError) as caught:
        _enroll(tmp_path, control_plane, token_file)
    message = str(caught.value)
    assert expected in message
    assert str(token_file) in message
    assert "HTTP 400" in message
    assert "new one-time token" in message
    assert not (tmp_path / "state" / "credential.json").exists()


def test_a_token_works_once(tmp_path: Path, control_plane: Any) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(control_plane.issue_token())
    _enroll(tmp_path / "first", control_plane, token_file, client_id="edge-a")
    with pytest.raises(EnrollmentError, match="was already used"):
        _enroll(tmp_path / "second", control_plane, token_file, client_id="edge-b")


def test_state_enrolled_as_another_device_is_refused(tmp_path: Path, control_plane: Any) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(control_plane.issue_token())
    _enroll(tmp_path, control_plane, token_file, client_id="edge-a")
    with pytest.raises(EnrollmentError, match="enrolled as 'edge-a', not 'edge-b'"):
        _enroll(tmp_path, control_plane, token_file, client_id="edge-b")


def test_token_file_problems(tmp_path: Path, control_plane: Any) -> None:
    with pytest.raises(EnrollmentError, match=r"token file .* not found"):
        _enroll(tmp_path, control_plane, tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(EnrollmentError, match="exactly one token"):
        _enroll(tmp_path, control_plane, empty)


def test_credential_readable_by_others_is_refused(tmp_path: Path, control_plane: Any) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(control_plane.issue_token())
    _enroll(tmp_path, control_plane, token_file)
    stored = tmp_path / "state" / "credential.json"
    stored.chmod(0o644)
    with pytest.raises(StateError, match="mode 644; it must be 0600"):
        _enroll(tmp_path, control_plane, token_file)


def test_one_client_per_state_directory(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    with (
        state.locked(),
        pytest.raises(StateError, match="in use by another edge client"),
        StateDir(tmp_path / "state").locked(),
    ):
        pass
