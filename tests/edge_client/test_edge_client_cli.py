"""`fednested tier2 ...` through the real root command: config errors name file and field, the audit check names
the tampered line, and a timed-out run says so with its own exit status."""

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from edge_client.sidecar import AuditLog
from fednested.cli import app as root_app


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(root_app, list(args), catch_exceptions=False)


def test_tier2_help_lists_the_edge_commands() -> None:
    result = _invoke("tier2", "--help")
    assert result.exit_code == 0
    assert "run-client" in result.output
    assert "verify-audit" in result.output


def test_bad_config_is_one_clear_line_naming_file_and_field(tmp_path: Path) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text("kind: tier2\nclient_id: edge-1\ncontrol_plane_url: ftp://nowhere\n")
    result = _invoke("tier2", "run-client", "--config", str(config))
    assert result.exit_code == 1
    assert f"error: {config}:3: field 'control_plane_url'" in result.output
    missing = _invoke("tier2", "run-client", "--config", str(tmp_path / "nope.yaml"))
    assert missing.exit_code == 1
    assert "config file not found" in missing.output


def test_verify_audit_names_the_tampered_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for index in range(3):
        log.append("outbound.allowed", {"bytes": index})
    ok = _invoke("tier2", "verify-audit", str(path))
    assert ok.exit_code == 0
    assert "3 entries, chain intact" in ok.output
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["details"]["bytes"] = 99
    lines[1] = json.dumps(entry)
    path.write_text("\n".join(lines) + "\n")
    bad = _invoke("tier2", "verify-audit", str(path))
    assert bad.exit_code == 1
    assert f"error: audit log {path}:2: entry was modified" in bad.output


def test_run_that_cannot_meet_its_goals_in_time_exits_2(
    tmp_path: Path, control_plane: Any, kit: Any, embedded_bus: Any
) -> None:
    control_plane.add_version(kit.assets.v1)
    control_plane.champion = "v1"
    files = kit.write_files(tmp_path / "device", control_plane, embedded_bus)
    result = _invoke(
        "tier2", "run-client", "--config", str(files["config"]), "--until-version", "v9", "--max-wait-s", "20", "--json"
    )
    assert result.exit_code == 2, result.output
    report = json.loads(result.output)
    assert report["stopped_because"] == "max_wait"
    assert report["current_version"] == "v1"
    assert report["pending"] == 0
    assert len(report["updates_delivered"]) == 1
