"""Simulated edge devices for the demo: each gets its own folder with private JSONL data in one domain, a
one-time enrollment token, a sidecar policy and a tier2 config, and runs the real edge client as a subprocess."""

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edge_client.sidecar.policy import example_policy
from fednested.data import Record, write_jsonl


@dataclass(frozen=True)
class EdgeTrainingPlan:
    """How long each device trains per round; kept small so three devices share two cores in seconds."""

    max_steps: int = 12
    seq_len: int = 128
    rows_per_batch: int = 4
    learning_rate: float = 5e-3
    adapter_rank: int = 4
    adapter_alpha: float = 8.0
    num_threads: int = 1


@dataclass(frozen=True)
class DemoDevice:
    """One simulated device: its client id, the domain of its private data, and its folder."""

    client_id: str
    domain: str
    directory: Path
    # How many times the plan's step budget it trains per run: a larger factor makes it report later.
    steps_factor: int = 1

    @property
    def config_path(self) -> Path:
        return self.directory / "edge.yaml"

    @property
    def state_dir(self) -> Path:
        return self.directory / "state"

    @property
    def log_path(self) -> Path:
        return self.directory / "client.log"


def prepare_device(
    device: DemoDevice,
    *,
    records: Sequence[Record],
    enrollment_token: str,
    control_plane_url: str,
    bus_path: Path,
    plan: EdgeTrainingPlan,
    seed: int,
) -> Path:
    """Write the device's data, token, policy and config; returns the config path."""
    data_file = device.directory / "data" / "train.jsonl"
    write_jsonl(data_file, records)
    token_file = device.directory / "secrets" / "enrollment-token"
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(enrollment_token + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    audit_log = device.state_dir / "audit" / "audit.jsonl"
    policy_file = device.directory / "policy.yaml"
    policy = example_policy(control_plane_url, local_only_paths=(str(audit_log),))
    policy_file.write_text(yaml.safe_dump(policy, sort_keys=False), encoding="utf-8")
    config: dict[str, Any] = {
        "kind": "tier2",
        "client_id": device.client_id,
        "display_name": f"{device.domain} device {device.client_id}",
        "control_plane_url": control_plane_url,
        "enrollment_token_file": str(token_file),
        "state_dir": str(device.state_dir),
        "sidecar_policy_path": str(policy_file),
        "audit_log_path": str(audit_log),
        "spool_dir": str(device.state_dir / "spool"),
        "poll_interval_s": 0.5,
        "data": {"train_files": [str(data_file)]},
        "adapter": {"rank": plan.adapter_rank, "alpha": plan.adapter_alpha, "init_seed": seed},
        "training": {
            "seq_len": plan.seq_len,
            "rows_per_batch": plan.rows_per_batch,
            "learning_rate": plan.learning_rate,
            "max_steps": plan.max_steps,
            "seed": seed,
            "precision": "fp32",
            "num_threads": plan.num_threads,
        },
        "retry": {"initial_delay_s": 0.5, "max_delay_s": 5.0, "max_attempts": 8},
        "bus": {"kind": "embedded", "path": str(bus_path)},
    }
    device.config_path.write_text(
        "# Written by `manage.py demo` for one simulated edge device.\n" + yaml.safe_dump(config, sort_keys=False),
        encoding="utf-8",
    )
    return device.config_path


def client_command(
    device: DemoDevice, *, rounds: int | None = None, until_version: str | None = None, max_wait_s: float
) -> list[str]:
    """`python -m fednested tier2 run-client ...` for this device: the same command an operator would run."""
    argv = [sys.executable, "-m", "fednested", "tier2", "run-client", "--config", str(device.config_path), "--json"]
    if rounds is not None:
        argv += ["--rounds", str(rounds)]
    if until_version is not None:
        argv += ["--until-version", until_version]
    return [*argv, "--max-wait-s", f"{max_wait_s:.0f}"]


def client_report(log_path: Path) -> dict[str, Any] | None:
    """The JSON run report a finished client printed (`--json`), found in its log; None if it printed none.

    The report is the last line that opens a JSON object; error lines may follow it.
    """
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    start = 0 if text.startswith("{") else text.rfind("\n{") + 1
    if start == 0 and not text.startswith("{"):
        return None
    try:
        report, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        return None
    return report if isinstance(report, dict) else None
