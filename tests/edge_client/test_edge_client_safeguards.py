"""The round's safeguards reach training: a device told to use EWC trains against the Fisher its version ships, and
one whose version ships no Fisher, or a Fisher it cannot use, fails the run with the reason instead of training
without the safeguard it was asked for."""

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edge_client.local_training import SafeguardFilesError, load_safeguard_inputs
from edge_client.runner import RunOptions, run_client
from fednested.adapters import attach_expert_adapters
from fednested.checkpoints import load_version, save_version, verify_version
from fednested.checkpoints.safeguards import parse_round_safeguards
from fednested.config.training import SafeguardConfig
from fednested.data import CorpusConfig, generate_corpus
from fednested.data.tokenizer import load_tokenizer
from fednested.messaging.bus import make_bus
from fednested.messaging.schemas import RoundStart
from fednested.messaging.topics import Topic
from fednested.training.safeguards import FISHER_FILE_NAME, estimate_fisher, save_fisher_file

EWC = {"safeguards": {"ewc_lambda": 5.0}}


@pytest.fixture(scope="module")
def fisher_versions(tmp_path_factory: pytest.TempPathFactory, edge_assets: Any) -> dict[str, Path]:
    """v1's weights saved again as 'w1' shipping their own Fisher, and as 'w2' shipping w1's (another version's)."""
    root = tmp_path_factory.mktemp("fisher-versions")
    model, _ = load_version(edge_assets.v1)
    tokenizer = load_tokenizer(edge_assets.v1)
    heldout = generate_corpus(CorpusConfig(seed=3, train_samples=4, heldout_samples=4))["code"].records("heldout")
    fisher = estimate_fisher(model, tokenizer, {"code": heldout}, max_tokens=256, seq_len=64)
    save_fisher_file(root / "fisher" / FISHER_FILE_NAME, fisher, version_id="w1", domains=["code"])
    files = {FISHER_FILE_NAME: root / "fisher" / FISHER_FILE_NAME}
    for version_id in ("w1", "w2"):
        save_version(
            model,
            root / version_id,
            version_id=version_id,
            parent_version=None,
            tokenizer=tokenizer,
            safeguard_files=files,
        )
    return {"w1": root / "w1", "w2": root / "w2"}


def _announce_round(bus_settings: Any, base_version: str, config: dict[str, Any]) -> None:
    now = datetime.now(UTC)
    event = RoundStart(
        round_id=f"round-{base_version}",
        base_version=base_version,
        deadline=now + timedelta(hours=1),
        config=config,
        started_at=now,
    )
    with make_bus(bus_settings) as bus:
        bus.publish(Topic.CONTROL_ROUNDS, event, key=base_version)


def _audit(files: dict[str, Path]) -> list[dict[str, Any]]:
    lines = (files["state"] / "audit" / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_a_round_asking_for_ewc_trains_against_the_fisher_its_version_ships(
    tmp_path: Path, control_plane: Any, kit: Any, embedded_bus: Any, fisher_versions: dict[str, Path]
) -> None:
    control_plane.add_version(fisher_versions["w1"])
    control_plane.champion = "w1"
    _announce_round(embedded_bus, "w1", EWC)
    files = kit.write_files(tmp_path / "device", control_plane, embedded_bus)
    report = run_client(kit.settings(files, control_plane, embedded_bus), RunOptions(rounds=1, max_wait_s=120))
    assert len(report.updates_delivered) == 1
    [finished] = [entry for entry in _audit(files) if entry.get("action") == "training.finished"]
    # the penalty ran at every step: its last value is recorded (0 before the first step moves the adapters)
    assert finished["details"]["ewc_penalty"] is not None
    assert finished["details"]["ewc_penalty"] > 0


def test_ewc_on_a_version_without_a_fisher_fails_the_run_with_the_reason(
    tmp_path: Path, control_plane: Any, kit: Any, embedded_bus: Any
) -> None:
    control_plane.add_version(kit.assets.v1)
    control_plane.champion = "v1"
    _announce_round(embedded_bus, "v1", EWC)
    files = kit.write_files(tmp_path / "device", control_plane, embedded_bus)
    with pytest.raises(SafeguardFilesError, match=r"version v1 ships no fisher\.safetensors; not training without it"):
        run_client(kit.settings(files, control_plane, embedded_bus), RunOptions(rounds=1, max_wait_s=120))
    assert not control_plane.payloads  # nothing trained, nothing sent
    failed = [entry for entry in _audit(files) if entry.get("action") == "training.failed"]
    assert len(failed) == 1
    assert "ships no fisher.safetensors" in failed[0]["details"]["error"]


def test_a_fisher_estimated_for_another_version_is_refused(
    tmp_path: Path, control_plane: Any, kit: Any, embedded_bus: Any, fisher_versions: dict[str, Path]
) -> None:
    # w2's manifest vouches for the file's bytes, but the file says it is the Fisher of w1's weights.
    control_plane.add_version(fisher_versions["w2"])
    control_plane.champion = "w2"
    _announce_round(embedded_bus, "w2", EWC)
    files = kit.write_files(tmp_path / "device", control_plane, embedded_bus)
    with pytest.raises(SafeguardFilesError, match=r"estimated for version 'w1', this model is version 'w2'"):
        run_client(kit.settings(files, control_plane, embedded_bus), RunOptions(rounds=1, max_wait_s=120))
    assert not control_plane.payloads


def test_a_corrupt_fisher_in_a_snapshot_is_refused_with_the_file_named(
    tmp_path: Path, fisher_versions: dict[str, Path], kit: Any
) -> None:
    directory = tmp_path / "w1"
    shutil.copytree(fisher_versions["w1"], directory)
    manifest = verify_version(directory)
    model, _ = load_version(directory)
    model = attach_expert_adapters(model, kit.adapter)
    ewc = SafeguardConfig(ewc_lambda=1.0)
    assert load_safeguard_inputs(model, directory, manifest, ewc).fisher  # intact: loads
    (directory / FISHER_FILE_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(SafeguardFilesError, match=r"fisher\.safetensors.*(corrupt|unreadable|cannot read)"):
        load_safeguard_inputs(model, directory, manifest, ewc)
    (directory / FISHER_FILE_NAME).unlink()
    with pytest.raises(SafeguardFilesError, match=r"fisher\.safetensors"):
        load_safeguard_inputs(model, directory, manifest, ewc)
    # without EWC the Fisher is not read at all
    assert load_safeguard_inputs(model, directory, manifest, SafeguardConfig()).fisher is None


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"ewc_lambda": -1}, "ewc_lambda"),
        ({"ewc_lambda": "strong"}, "ewc_lambda"),
        ({"replay_fraction": 1.0}, "replay_fraction"),
        ({"freeze_experts": ["one:two"]}, "freeze_experts"),
        ({"ewc_lamda": 1.0}, "unknown keys ['ewc_lamda']"),
        ({"fisher_file": "/etc/passwd"}, "unknown keys ['fisher_file']"),
        ([1, 2], "must be an object"),
    ],
)
def test_the_round_section_is_refused_naming_the_bad_key(section: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        parse_round_safeguards({"safeguards": section})


def test_the_round_section_reads_json_lists_as_the_config_tuples() -> None:
    parsed = parse_round_safeguards({"safeguards": {"ewc_lambda": 2, "freeze_layers": [0], "freeze_experts": ["1:3"]}})
    assert parsed == SafeguardConfig(ewc_lambda=2.0, freeze_layers=(0,), freeze_experts=("1:3",))
    assert parse_round_safeguards({"clip_norm": 1.0}) is None
