"""The `fednested` command line, driven through Typer's CliRunner on real files (and a real broker for Kafka)."""

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fednested.cli import LazyCommandGroup, app, build_app
from fednested.config import Tier2Config, load_config, render_sample

REPO_ROOT = Path(__file__).resolve().parents[3]
runner = CliRunner()


def test_init_config_prints_a_sample_that_validates(tmp_path: Path) -> None:
    result = runner.invoke(app, ["init-config", "tier2"])
    assert result.exit_code == 0, result.output
    assert result.stdout == render_sample("tier2")
    path = tmp_path / "edge.yaml"
    path.write_text(result.stdout)
    assert isinstance(load_config(path, "tier2"), Tier2Config)


def test_init_config_writes_a_file_and_overwrites_only_with_force(tmp_path: Path) -> None:
    path = tmp_path / "configs" / "cluster.yaml"
    result = runner.invoke(app, ["init-config", "tier1", "--output", str(path)])
    assert result.exit_code == 0, result.output
    assert f"wrote {path}; check it with: fednested config validate {path} --kind tier1" in result.stdout
    assert path.read_text() == render_sample("tier1")

    path.write_text("kind: tier1\n# my edits\n")
    refused = runner.invoke(app, ["init-config", "tier1", "--output", str(path)])
    assert refused.exit_code == 1
    assert refused.stderr == f"error: {path}: already exists; pass --force to overwrite it\n"
    assert path.read_text() == "kind: tier1\n# my edits\n"

    forced = runner.invoke(app, ["init-config", "tier1", "--output", str(path), "--force"])
    assert forced.exit_code == 0
    assert path.read_text() == render_sample("tier1")
    assert sorted(p.name for p in path.parent.iterdir()) == ["cluster.yaml"]  # no partial file left behind


def test_init_config_rejects_an_unknown_kind() -> None:
    result = runner.invoke(app, ["init-config", "tier3"])
    assert result.exit_code == 2
    assert "tier3" in result.output


def test_config_validate_accepts_a_good_file_and_lists_each_problem_of_a_bad_one(tmp_path: Path) -> None:
    good = tmp_path / "edge.yaml"
    good.write_text(render_sample("tier2"))
    result = runner.invoke(app, ["config", "validate", str(good), "--kind", "tier2"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{good}: valid tier2 configuration (bus: embedded)\n"

    bad = tmp_path / "bad.yaml"
    text = render_sample("tier2").replace("rank: 8", "rank: eight").replace("strict: false", "stric: false")
    bad.write_text(text)
    # The line each problem is reported at is where the sample has it.
    stric_line, rank_line = (text.splitlines().index(line) + 1 for line in _lines_with(text, "stric:", "rank: eight"))
    result = runner.invoke(app, ["config", "validate", str(bad)])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"error: {bad}:{stric_line}: field 'data.stric': unknown setting")
    assert lines[1].startswith(f"error: {bad}:{rank_line}: field 'adapter.rank': Input should be a valid integer")
    assert result.stdout == ""


def _lines_with(text: str, *fragments: str) -> list[str]:
    """The one line of `text` holding each fragment (as a YAML key, not in a comment)."""
    found = []
    for fragment in fragments:
        [line] = [line for line in text.splitlines() if line.strip().startswith(fragment)]
        found.append(line)
    return found


def test_config_validate_reports_missing_file_and_wrong_kind(tmp_path: Path) -> None:
    missing = runner.invoke(app, ["config", "validate", str(tmp_path / "nope.yaml"), "--kind", "tier1"])
    assert (missing.exit_code, missing.stderr) == (1, f"error: {tmp_path / 'nope.yaml'}: config file not found\n")
    edge = tmp_path / "edge.yaml"
    edge.write_text(render_sample("tier2"))
    wrong = runner.invoke(app, ["config", "validate", str(edge), "--kind", "tier1"])
    assert wrong.exit_code == 1
    assert wrong.stderr == f"error: {edge}:6: field 'kind': file says 'tier2' but 'tier1' is needed\n"


def test_bootstrap_topics_on_an_embedded_bus_is_idempotent(tmp_path: Path) -> None:
    bus_file = tmp_path / "bus.sqlite3"
    first = runner.invoke(app, ["messaging", "bootstrap-topics", "--embedded", str(bus_file)])
    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines() == [
        "created control.federation_rounds: 1 partition, retention 90d",
        "created updates.experts.local: 6 partitions, retention 7d",
        "created telemetry.edge: 3 partitions, retention 3d",
        "created tasks.training: 3 partitions, retention 7d",
    ]
    second = runner.invoke(app, ["messaging", "bootstrap-topics", "--embedded", str(bus_file)])
    assert second.exit_code == 0
    assert second.stdout.splitlines()[-1] == (
        f"nothing to change on embedded bus {bus_file}: all 4 topics match the configuration"
    )


def test_bootstrap_topics_from_a_config_applies_its_topic_settings(tmp_path: Path) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(
        "kind: tier1\nbus:\n  kind: embedded\n  path: bus/events.db\n"
        "  topics:\n    updates: {partitions: 2, retention_ms: 3600000}\n"
    )
    result = runner.invoke(app, ["messaging", "bootstrap-topics", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "created updates.experts.local: 2 partitions, retention 1h" in result.stdout.splitlines()
    assert (tmp_path / "bus" / "events.db").is_file()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([], "error: give exactly one of --config PATH, --bootstrap HOST:PORT, --embedded PATH\n"),
        (
            ["--bootstrap", "k:9092", "--embedded", "x.db"],
            "error: give exactly one of --config PATH, --bootstrap HOST:PORT, --embedded PATH "
            "(got --bootstrap and --embedded)\n",
        ),
        (
            ["--bootstrap", "localhost"],
            "error: --bootstrap: field 'bootstrap_servers': String should match pattern "
            "'^[^,\\s]+:\\d+(,[^,\\s]+:\\d+)*$' (got 'localhost')\n",
        ),
    ],
)
def test_bootstrap_topics_rejects_unclear_targets(arguments: list[str], message: str) -> None:
    result = runner.invoke(app, ["messaging", "bootstrap-topics", *arguments])
    assert (result.exit_code, result.stderr) == (1, message)


def test_bootstrap_topics_reports_a_bad_config_by_file_and_field(tmp_path: Path) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text("kind: tier1\nbus:\n  kind: kafka\n  bootstrap_server: k:9092\n")
    result = runner.invoke(app, ["messaging", "bootstrap-topics", "--config", str(config)])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: {config}:2: field 'bus.bootstrap_servers': required setting is missing",
        f"error: {config}:4: field 'bus.bootstrap_server': unknown setting (check the spelling; "
        "`fednested init-config` writes every valid one)",
    ]


@pytest.mark.kafka
def test_bootstrap_topics_on_kafka_creates_then_changes_nothing(tmp_path: Path) -> None:
    servers = os.environ.get("FEDNESTED_KAFKA_BOOTSTRAP")
    if not servers:
        if os.environ.get("FEDNESTED_REQUIRE_SERVICES") == "1":
            pytest.fail("FEDNESTED_REQUIRE_SERVICES=1 but FEDNESTED_KAFKA_BOOTSTRAP is not set: Kafka is not running")
        pytest.skip("Kafka not running: `scripts/services.sh start && source var/services/env.sh`")
    prefix = f"cli-{uuid.uuid4().hex[:10]}."
    config = tmp_path / "cluster.yaml"
    config.write_text(
        f"kind: tier1\nbus:\n  kind: kafka\n  bootstrap_servers: {servers}\n  topics: {{prefix: {prefix}}}\n"
    )
    first = runner.invoke(app, ["messaging", "bootstrap-topics", "--config", str(config)])
    assert first.exit_code == 0, first.output
    assert f"created {prefix}updates.experts.local: 6 partitions, retention 7d" in first.stdout.splitlines()
    second = runner.invoke(app, ["messaging", "bootstrap-topics", "--config", str(config)])
    assert second.exit_code == 0, second.output
    assert (
        second.stdout.splitlines()[-1]
        == f"nothing to change on Kafka at {servers}: all 4 topics match the configuration"
    )


def test_lazy_group_that_is_not_installed_says_so() -> None:
    missing = LazyCommandGroup("tier2", "fednested_missing_pkg.cli", "app", "Edge commands.", "install it with pip")
    result = runner.invoke(build_app([missing]), ["tier2", "run-client", "--config", "edge.yaml"])
    assert result.exit_code == 1
    assert result.stderr == (
        "error: `fednested tier2` needs fednested_missing_pkg.cli, which is not installed; install it with pip\n"
    )


def test_lazy_group_forwards_arguments_help_and_exit_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "fake_edge"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "cli.py").write_text(
        textwrap.dedent(
            """
            from pathlib import Path
            import typer

            app = typer.Typer()

            @app.command("run-client")
            def run_client(config: Path = typer.Option(..., "--config"), rounds: int = 1) -> None:
                \"\"\"Run the fake client.\"\"\"
                typer.echo(f"running {config.name} for {rounds} rounds")
                raise typer.Exit(code=3 if rounds > 5 else 0)

            @app.command("enroll")
            def enroll() -> None:
                typer.echo("enrolled")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cli = build_app([LazyCommandGroup("tier2", "fake_edge.cli", "app", "Edge commands.", "pip install it")])
    ran = runner.invoke(cli, ["tier2", "run-client", "--config", "edge.yaml", "--rounds", "2"])
    assert (ran.exit_code, ran.stdout) == (0, "running edge.yaml for 2 rounds\n")
    failed = runner.invoke(cli, ["tier2", "run-client", "--config", "edge.yaml", "--rounds", "9"])
    assert failed.exit_code == 3
    helped = runner.invoke(cli, ["tier2", "--help"])
    assert helped.exit_code == 0
    assert "run-client" in helped.stdout
    assert "enroll" in helped.stdout
    assert "Usage: fednested tier2" in " ".join(helped.stdout.split())


def test_python_dash_m_runs_the_cli_without_importing_optional_packages(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "fednested", "config", "validate", str(tmp_path / "x.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr == f"error: {tmp_path / 'x.yaml'}: config file not found\n"
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, fednested.cli, fednested.messaging, fednested.config; "
            "print(sorted(m for m in ('edge_client', 'confluent_kafka', 'torch', 'django') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert probe.stdout.strip() == "[]", probe.stderr
