"""The demo's parts on their own: the loss table, the demo environment, device folders, child processes, and the
bootstrapped first version."""

import os
import stat
import sys
import time
from pathlib import Path

import pytest

from apps.demo.bootstrap import BootstrapConfig, build_first_version, demo_corpus, general_mix, heldout_by_domain
from apps.demo.devices import DemoDevice, EdgeTrainingPlan, client_command, client_report, prepare_device
from apps.demo.environment import SERVICE_VARIABLES, DemoPaths, demo_environment, running_in_demo_environment
from apps.demo.processes import DemoError, free_port, start_process, wait_for_http
from apps.demo.report import GateOutcome, VersionScores, gate_table, loss_table
from apps.governance.gate import check_thresholds, parse_gate
from controlplane.settings import database_from_url
from edge_client.sidecar.policy import load_policy
from fednested.checkpoints import load_version, verify_version
from fednested.config import load_config
from fednested.data import read_jsonl
from fednested.training.safeguards import FISHER_FILE_NAME, estimate_fisher, load_fisher_file, save_fisher_file


def test_loss_table_shows_each_version_against_its_parent() -> None:
    table = loss_table(
        [
            VersionScores("v1", None, {"legal": 3.0, "medical": 2.0}),
            VersionScores("r1", "v1", {"legal": 2.5, "medical": 2.25}),
        ],
        trained_domains=["legal"],
    )
    assert table.splitlines() == [
        "domain      v1              r1",
        "-------  -----  --------------",
        "legal *  3.000  2.500 (-0.500)",
        "medical  2.000  2.250 (+0.250)",
    ]
    assert loss_table([]) == "(no versions evaluated)"


def test_demo_environment_drops_services_and_points_everything_at_the_demo_folder(tmp_path: Path) -> None:
    paths = DemoPaths(tmp_path / "demo")
    base = {name: "set" for name in SERVICE_VARIABLES} | {"PATH": "/usr/bin", "FEDNESTED_BUS": "kafka"}
    env = demo_environment(base, paths)
    assert env["PATH"] == "/usr/bin"
    assert env["FEDNESTED_BUS"] == "embedded"
    assert env["FEDNESTED_BUS_PATH"] == str(paths.bus)
    assert env["FEDNESTED_ARTIFACT_ROOT"] == str(paths.artifacts)
    assert "CELERY_BROKER_URL" not in env
    assert "FEDNESTED_KAFKA_BOOTSTRAP" not in env
    database = database_from_url(env["DATABASE_URL"])
    assert database["ENGINE"] == "django.db.backends.sqlite3"
    assert database["NAME"] == str(paths.database)
    assert env["DJANGO_SETTINGS_MODULE"] == "controlplane.settings"
    assert database["OPTIONS"]["transaction_mode"] == "IMMEDIATE"
    assert not running_in_demo_environment(paths)


def test_a_device_folder_holds_a_valid_config_policy_token_and_data(tmp_path: Path) -> None:
    corpus = demo_corpus(BootstrapConfig(train_samples=6, heldout_samples=2))
    device = DemoDevice(client_id="edge-legal-01", domain="legal", directory=tmp_path / "edge-legal-01")
    records = corpus["legal"].mixed_records("train")
    config_path = prepare_device(
        device,
        records=records,
        enrollment_token="fne_secret",
        control_plane_url="http://127.0.0.1:8123",
        bus_path=tmp_path / "bus.sqlite3",
        plan=EdgeTrainingPlan(max_steps=3),
        seed=7,
    )
    config = load_config(config_path, "tier2")
    assert config.client_id == "edge-legal-01"
    assert config.training.max_steps == 3
    assert config.bus.kind == "embedded"
    policy = load_policy(config.sidecar_policy_path)
    assert policy.endpoint_allowed("http://127.0.0.1:8123/api/v1/enroll/")
    assert not policy.endpoint_allowed("http://127.0.0.1:8123/admin/")
    assert config.enrollment_token_file.read_text().strip() == "fne_secret"
    assert stat.S_IMODE(config.enrollment_token_file.stat().st_mode) == 0o600
    assert len(read_jsonl(config.data.train_files[0], strict=True).records) == len(records)
    argv = client_command(device, rounds=2, until_version="round-2-candidate", max_wait_s=60)
    assert argv[1:5] == ["-m", "fednested", "tier2", "run-client"]
    assert argv[-6:] == ["--rounds", "2", "--until-version", "round-2-candidate", "--max-wait-s", "60"]


def test_client_report_is_the_json_object_at_the_end_of_the_log(tmp_path: Path) -> None:
    log = tmp_path / "client.log"
    log.write_text('WARNING something\n{\n  "client_id": "edge-1",\n  "trained_on": ["v1"]\n}\n')
    assert client_report(log) == {"client_id": "edge-1", "trained_on": ["v1"]}
    log.write_text(
        '{"client_id": "edge-1", "updates_failed": [["u1", "sidecar refused"]]}\nerror: update u1 was not sent\n'
    )
    assert client_report(log) == {"client_id": "edge-1", "updates_failed": [["u1", "sidecar refused"]]}
    log.write_text("error: the control plane refused\n")
    assert client_report(log) is None
    assert client_report(tmp_path / "missing.log") is None


def test_general_mix_interleaves_domains_and_heldout_is_separate() -> None:
    corpus = demo_corpus(BootstrapConfig(train_samples=4, heldout_samples=3))
    mix = general_mix(corpus)
    assert len(mix) == 4 * len(corpus)
    first_round = mix[: len(corpus)]
    assert [record for record in first_round] == [domain.mixed_records("train")[0] for domain in corpus.values()]
    heldout = heldout_by_domain(corpus, ["code", "legal"])
    assert list(heldout) == ["code", "legal"]
    assert all(len(records) == 3 for records in heldout.values())
    assert not set(map(str, heldout["legal"])) & set(map(str, corpus["legal"].records("train", "text")))


def test_free_port_prefers_the_asked_one_and_avoids_a_taken_one() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert free_port(port) != port
    assert free_port(port) == port


def test_a_child_that_dies_fails_the_wait_with_its_log_and_stop_ends_a_live_one(tmp_path: Path) -> None:
    dying = start_process(
        "dying server",
        [sys.executable, "-c", "import sys; print('port already in use'); sys.exit(3)"],
        env=dict(os.environ),
        log_path=tmp_path / "dying.log",
        cwd=tmp_path,
    )
    with pytest.raises(DemoError, match=r"dying server exited before it answered \(exit status 3\)") as failure:
        wait_for_http("http://127.0.0.1:9/", dying, timeout_s=30)
    assert "port already in use" in str(failure.value)
    sleeper = start_process(
        "sleeper",
        [sys.executable, "-c", "import time; time.sleep(600)"],
        env=dict(os.environ),
        log_path=tmp_path / "s.log",
        cwd=tmp_path,
    )
    assert sleeper.running
    started = time.monotonic()
    sleeper.stop(timeout_s=5)
    assert not sleeper.running
    assert time.monotonic() - started < 10


def test_the_first_version_is_a_verified_pretrained_checkpoint(tmp_path: Path) -> None:
    config = BootstrapConfig(train_samples=8, heldout_samples=2, pretrain_steps=3, seq_len=64, rows_per_batch=4)
    first = build_first_version(demo_corpus(config), config, tmp_path / "v1")
    manifest = verify_version(first.directory)
    assert manifest.version_id == "v1"
    assert manifest.parent_version is None
    assert any(entry.partition == "tokenizer" for entry in manifest.files.values())
    assert first.pretraining is not None
    assert first.pretraining.steps == 3
    assert first.pretraining.loss_curve[-1] < first.pretraining.loss_curve[0]


def test_the_first_version_ships_the_fisher_of_its_pretrained_weights(tmp_path: Path) -> None:
    config = BootstrapConfig(train_samples=8, heldout_samples=2, pretrain_steps=1, seq_len=64, rows_per_batch=4)
    corpus = demo_corpus(config)
    estimated: dict[str, object] = {}

    def fisher_files(model: object, tokenizer: object, folder: Path) -> tuple[dict[str, Path], dict[str, object]]:
        fisher = estimate_fisher(model, tokenizer, heldout_by_domain(corpus, ["code"]), max_tokens=64, seq_len=32)
        estimated.update(fisher)
        save_fisher_file(folder / FISHER_FILE_NAME, fisher, version_id="v1", domains=["code"])
        return {FISHER_FILE_NAME: folder / FISHER_FILE_NAME}, {"fisher": {"domains": ["code"]}}

    first = build_first_version(corpus, config, tmp_path / "v1", safeguard_files=fisher_files)  # type: ignore[arg-type]
    manifest = verify_version(first.directory)
    assert manifest.files[FISHER_FILE_NAME].partition == "safeguards"
    assert manifest.lineage["safeguards"] == {"fisher": {"domains": ["code"]}}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["v1"]  # the scratch folder is gone
    model, _ = load_version(first.directory)
    shipped = load_fisher_file(first.directory / FISHER_FILE_NAME, expected_version="v1", model=model)
    # estimated on the pre-trained weights that were saved, not on the freshly built ones
    assert sorted(shipped) == sorted(estimated)


def test_the_summary_names_the_candidate_the_gate_held_with_its_domain_and_figures() -> None:
    gate = parse_gate(
        {"protected": {"code": {"max_increase_nats": 0.02}, "telemetry": {"max_increase_nats": 0.02}}},
        source="promotion-gate.json",
        known_domains=["code", "legal", "telemetry"],
    )
    outcomes = []
    for version_id, losses in (
        ("demo-candidate", {"code": 3.41, "telemetry": 3.07, "legal": 3.7}),
        ("demo.2-candidate", {"code": 3.46, "telemetry": 3.075, "legal": 3.6}),
    ):
        breaches = check_thresholds(
            gate, losses, {"parent": ("v1", {"code": 3.40, "telemetry": 3.06}), "champion": None}
        )
        outcomes.append(GateOutcome(version_id, bool(breaches), tuple(breach.describe() for breach in breaches)))
    assert gate_table(outcomes).splitlines() == [
        "demo-candidate    passed: promoted",
        "demo.2-candidate  HELD by the gate, not promoted:",
        "                    code: loss 3.4600 vs parent v1 3.4000 is +0.0600 nats, over the 0.0200 allowed",
    ]
    assert gate_table([]) == "(no candidate was decided)"
