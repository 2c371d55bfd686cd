"""The scheduled champion check: a device whose ModelAvailable event was lost still moves to the new champion
within its check interval, and the interval is bounded in the tier2 config."""

import threading
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from edge_client.runner import RunOptions, run_client
from fednested.config import Tier2Config


def test_a_device_whose_event_was_lost_moves_to_the_champion_at_its_next_check(
    tmp_path: Path, control_plane: Any, kit: Any, embedded_bus: Any
) -> None:
    control_plane.add_version(kit.assets.v1)
    control_plane.add_version(kit.assets.v2)
    control_plane.champion = "v1"
    files = kit.write_files(tmp_path / "device", control_plane, embedded_bus)
    settings = kit.settings(files, control_plane, embedded_bus, champion_check_interval_s=1.0)
    outcome: list[Any] = []
    thread = threading.Thread(
        target=lambda: outcome.append(run_client(settings, RunOptions(rounds=1, until_version="v2", max_wait_s=120)))
    )
    thread.start()
    kit.wait_until(lambda: bool(control_plane.payloads) or not thread.is_alive(), what="the device's upload")
    control_plane.champion = "v2"  # promoted, but its ModelAvailable never reaches the bus
    thread.join(timeout=150)
    [report] = outcome
    assert (report.stopped_because, report.current_version, report.versions) == ("goals_met", "v2", ["v1", "v2"])


CONFIG = {
    "client_id": "edge-1",
    "control_plane_url": "http://127.0.0.1:8000",
    "enrollment_token_file": "token",
    "sidecar_policy_path": "policy.yaml",
    "data": {"train_files": ["train.jsonl"]},
    "bus": {"kind": "embedded", "path": "bus.sqlite3"},
}


@pytest.mark.parametrize("interval", [0.5, 100_000.0])
def test_the_champion_check_interval_is_bounded(interval: float) -> None:
    assert Tier2Config.model_validate(CONFIG).champion_check_interval_s == 300.0
    assert Tier2Config.model_validate({**CONFIG, "champion_check_interval_s": 60.0}).champion_check_interval_s == 60.0
    with pytest.raises(ValidationError, match="champion_check_interval_s"):
        Tier2Config.model_validate({**CONFIG, "champion_check_interval_s": interval})
