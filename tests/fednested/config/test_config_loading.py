"""Loading tier1/tier2 configs: samples validate, every error names file, line, field and problem, and relative
paths resolve against the config file's directory."""

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from fednested.config import (
    ConfigError,
    Tier1Config,
    Tier2Config,
    load_config,
    render_sample,
)
from fednested.messaging import EmbeddedBusSettings, KafkaBusSettings

MINIMAL_TIER2 = """\
kind: tier2
client_id: edge-0001
control_plane_url: https://cp.example.org/
enrollment_token_file: secrets/token
sidecar_policy_path: /etc/fednested/policy.yaml
data:
  train_files: [data/a.jsonl, ~/b.jsonl]
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_lines(path: Path, kind: str | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, kind)  # type: ignore[call-overload]
    assert caught.value.path == path
    return caught.value.lines()


@pytest.mark.parametrize("kind", ["tier1", "tier2"])
def test_sample_config_validates_and_documents_every_setting(tmp_path: Path, kind: str) -> None:
    text = render_sample(kind)  # type: ignore[arg-type]
    path = write(tmp_path, text)
    config = load_config(path)
    assert config.kind == kind
    assert isinstance(config.bus, EmbeddedBusSettings)
    assert config.bus.path == tmp_path / "var" / "bus.sqlite3"
    # Every setting in the file sits under a comment that explains it.
    lines = text.splitlines()
    settings = [i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")]
    assert all(lines[i - 1].lstrip().startswith("#") for i in settings)
    assert len(settings) == count_fields(type(config), config)


def count_fields(model: type[BaseModel], instance: BaseModel) -> int:
    total = 0
    for name, info in model.model_fields.items():
        assert info.description, f"{model.__name__}.{name} has no description for the sample's comment"
        value = getattr(instance, name)
        total += 1 + (count_fields(type(value), value) if isinstance(value, BaseModel) else 0)
    return total


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    path = write(tmp_path / "site", MINIMAL_TIER2)
    config = load_config(path, "tier2")
    assert isinstance(config, Tier2Config)
    assert config.enrollment_token_file == tmp_path / "site" / "secrets" / "token"
    assert config.sidecar_policy_path == Path("/etc/fednested/policy.yaml")
    assert config.data.train_files == [tmp_path / "site" / "data" / "a.jsonl", Path.home() / "b.jsonl"]
    assert config.spool_dir == tmp_path / "site" / "state" / "spool"
    assert config.control_plane_url == "https://cp.example.org"
    assert config.training.max_steps == 100


def test_kafka_bus_section_and_topic_settings_load(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "kind: tier1\nbus:\n  kind: kafka\n  bootstrap_servers: k1:9092,k2:9092\n"
        "  topics:\n    prefix: prod.\n    updates: {partitions: 24, retention_ms: 86400000}\n",
    )
    config = load_config(path, "tier1")
    assert isinstance(config, Tier1Config)
    assert isinstance(config.bus, KafkaBusSettings)
    assert config.bus.bootstrap_servers == "k1:9092,k2:9092"
    assert config.bus.topics.updates.partitions == 24
    assert config.bus.topics.telemetry.partitions == 3


def test_unknown_field_is_named_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_TIER2 + "training:\n  max_steps: 5\n  learning_rat: 0.1\n")
    assert error_lines(path) == [
        f"{path}:10: field 'training.learning_rat': unknown setting (check the spelling; "
        "`fednested init-config` writes every valid one)"
    ]


def test_wrong_types_are_named_with_line_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_TIER2 + "training:\n  rows_per_batch: many\nadapter:\n  targets: [w1, 3]\n")
    assert error_lines(path) == [
        f"{path}:9: field 'training.rows_per_batch': Input should be a valid integer, unable to parse string as an "
        "integer (got 'many')",
        f"{path}:11: field 'adapter.targets[1]': Input should be a valid string (got 3)",
    ]


def test_missing_required_settings_point_at_their_section(tmp_path: Path) -> None:
    path = write(tmp_path, "kind: tier2\nclient_id: edge-1\ndata: {}\nbus:\n  kind: kafka\n")
    assert error_lines(path) == [
        f"{path}:1: field 'control_plane_url': required setting is missing",
        f"{path}:1: field 'enrollment_token_file': required setting is missing",
        f"{path}:1: field 'sidecar_policy_path': required setting is missing",
        f"{path}:3: field 'data.train_files': required setting is missing",
        f"{path}:4: field 'bus.bootstrap_servers': required setting is missing",
    ]


def test_cross_field_rules_say_what_to_change(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL_TIER2.replace("https://cp.example.org/", "ftp://cp")
        + "training: {max_steps: null}\nretry: {initial_delay_s: 10, max_delay_s: 1}\nbus: {kind: rabbitmq}\n",
    )
    lines = error_lines(path)
    assert (
        lines[0]
        == f"{path}:3: field 'control_plane_url': must be an http:// or https:// URL with a host, got 'ftp://cp'"
    )
    assert lines[1].startswith(f"{path}:8: field 'training': set at least one of max_steps, max_epochs, max_seconds")
    assert lines[2].startswith(f"{path}:9: field 'retry': max_delay_s 1.0 is below initial_delay_s 10.0")
    assert lines[3] == f"{path}:10: field 'bus.kind': must be one of 'kafka', 'embedded' (got 'rabbitmq')"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "kind: tier2\nclient_id: [unclosed\n",
            ":3: YAML syntax error, column 1: expected ',' or ']', but got '<stream end>'",
        ),
        ("kind: tier1\n  model: x\n", ":2: YAML syntax error, column 8: mapping values are not allowed here"),
        ("", ":1: expected a mapping of settings, got an empty file"),
        ("- tier1\n", ":1: expected a mapping of settings, got a list"),
        ("kind: tier1\nmodel: {seed: 1}\nmodel: {seed: 2}\n", ":3: field 'model': duplicate key (first set on line 2)"),
        (
            "model: {seed: 1}\n",
            ":1: field 'kind': missing: set kind: tier1 or kind: tier2 (or pass the kind explicitly)",
        ),
        ("kind: tier3\n", ":1: field 'kind': must be 'tier1' or 'tier2', got 'tier3'"),
    ],
)
def test_unreadable_documents_are_reported_with_position(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    assert error_lines(path) == [f"{path}{expected}"]


def test_bus_section_must_say_which_bus(tmp_path: Path) -> None:
    path = write(tmp_path, "kind: tier1\nbus:\n  path: events.db\n")
    assert error_lines(path) == [f"{path}:2: field 'bus.kind': required setting is missing (kafka or embedded)"]


def test_kind_in_file_must_match_the_kind_asked_for(tmp_path: Path) -> None:
    path = write(tmp_path, "# a cluster\nkind: tier1\n")
    assert error_lines(path, "tier2") == [f"{path}:2: field 'kind': file says 'tier1' but 'tier2' is needed"]
    assert isinstance(load_config(write(tmp_path, "model: {seed: 3}\n", "nokind.yaml"), "tier1"), Tier1Config)


def test_missing_file_and_directory_are_reported(tmp_path: Path) -> None:
    assert error_lines(tmp_path / "absent.yaml") == [f"{tmp_path / 'absent.yaml'}: config file not found"]
    assert error_lines(tmp_path) == [f"{tmp_path}: is a directory, not a config file"]


def test_sample_round_trips_through_yaml_unchanged() -> None:
    document = yaml.safe_load(render_sample("tier2"))
    assert Tier2Config.model_validate(document).model_dump(mode="json") == document
