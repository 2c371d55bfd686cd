"""Loading tier1/tier2 configs: samples validate, every error names file, line, field and problem, and relative
paths resolve against the config file's directory."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from fednested.config import (
    ConfigError,
    EdgeTrainConfig,
    ExpertLoraConfig,
    RetryPolicy,
    Tier1Config,
    Tier2Config,
    load_config,
    render_sample,
)
from fednested.messaging import EmbeddedBusSettings, KafkaBusSettings

ROOT = Path(__file__).resolve().parents[3]

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
        total += 1
        if isinstance(value, BaseModel):
            total += count_fields(type(value), value)
        elif dataclasses.is_dataclass(value):
            total += count_dataclass_fields(value)
    return total


def count_dataclass_fields(value: Any) -> int:
    """A dataclass section (adapter, training, retry) and the dataclasses nested in it (training.safeguards): every
    field has its help text in its metadata."""
    specs = dataclasses.fields(value)
    assert all(spec.metadata.get("help") for spec in specs), f"{type(value).__name__} lacks a help text"
    nested = [getattr(value, spec.name) for spec in specs]
    return len(specs) + sum(count_dataclass_fields(item) for item in nested if dataclasses.is_dataclass(item))


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
    assert lines[1] == (
        f"{path}:8: field 'training': set at least one budget (max_steps, max_epochs or max_seconds), "
        "or a run never ends"
    )
    assert lines[2] == f"{path}:9: field 'retry.max_delay_s': must be at least initial_delay_s (10.0), got 1.0"
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


UNKNOWN_SETTING = "unknown setting (check the spelling; `fednested init-config` writes every valid one)"


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("adapter", "rnak"),
        # Internal to the adapters (PEFT's adapter name), so not a setting a device can choose.
        ("adapter", "adapter_name"),
        ("training", "learning_rat"),
        ("retry", "jiter"),
    ],
)
def test_an_unknown_key_in_a_dataclass_section_is_refused_with_its_path(tmp_path: Path, section: str, key: str) -> None:
    path = write(tmp_path, MINIMAL_TIER2 + f"{section}:\n  {key}: 1\n")
    assert error_lines(path) == [f"{path}:9: field '{section}.{key}': {UNKNOWN_SETTING}"]


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("adapter:\n  rank: 0\n", "field 'adapter.rank': must be at least 1, got 0"),
        ("adapter:\n  dropout: 1\n", "field 'adapter.dropout': must be less than 1, got 1.0"),
        (
            "adapter:\n  targets: [q_proj]\n",
            "field 'adapter.targets': must be a non-empty subset of ('gate_up_proj', 'down_proj'), got ['q_proj']",
        ),
        ("adapter:\n  experts: []\n", "field 'adapter.experts': must have at least 1 item(s), got []"),
        ("training:\n  seq_len: 4\n", "field 'training.seq_len': must be at least 8, got 4"),
        (
            "training:\n  adam_betas: [0.9, 1.5]\n",
            "field 'training.adam_betas': must be two numbers in [0, 1), got (0.9, 1.5)",
        ),
        (
            "training:\n  precision: fp16\n",
            "field 'training.precision': Input should be 'auto', 'fp32' or 'bf16' (got 'fp16')",
        ),
        ("retry:\n  jitter: 2\n", "field 'retry.jitter': must be at most 1, got 2.0"),
        ("retry:\n  max_attempts: 0\n", "field 'retry.max_attempts': must be at least 1, got 0"),
    ],
)
def test_a_bad_value_in_a_dataclass_section_is_refused_naming_the_field(
    tmp_path: Path, setting: str, expected: str
) -> None:
    path = write(tmp_path, MINIMAL_TIER2 + setting)
    assert error_lines(path) == [f"{path}:9: {expected}"]


def test_dataclass_sections_are_the_edge_dataclasses_themselves(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL_TIER2
        + "adapter: {rank: 4, experts: [3, 1]}\ntraining: {recompute_experts: true}\nretry: {jitter: 0}\n",
    )
    config = load_config(path, "tier2")
    assert config.adapter == ExpertLoraConfig(rank=4, experts=[1, 3])
    assert config.training == EdgeTrainConfig(recompute_experts=True)
    assert config.retry == RetryPolicy(jitter=0.0)


# Runs in a fresh interpreter on a copy of the package whose dataclasses got new defaults in their source.
CHANGED_DEFAULTS_PROBE = """
import json, sys, yaml
import fednested
from fednested.config import Tier2Config, render_sample
assert fednested.__file__.startswith(sys.argv[1]), fednested.__file__
minimal = {"client_id": "e", "control_plane_url": "http://cp", "enrollment_token_file": "t",
           "sidecar_policy_path": "p", "data": {"train_files": ["d"]}}
defaults = Tier2Config.model_validate(minimal)
sections = {"adapter": {"alpha": 4}, "training": {"seed": 1}, "retry": {"jitter": 0}}
partial = Tier2Config.model_validate({**minimal, **sections})
sample = yaml.safe_load(render_sample("tier2"))
print(json.dumps({
    "model": [defaults.adapter.rank, defaults.training.max_steps, defaults.retry.max_attempts],
    "partial_section": [partial.adapter.rank, partial.training.max_steps, partial.retry.max_attempts],
    "sample": [sample["adapter"]["rank"], sample["training"]["max_steps"], sample["retry"]["max_attempts"]],
}))
"""


def test_a_default_changed_in_the_dataclass_reaches_the_yaml_model_and_the_sample(tmp_path: Path) -> None:
    package = tmp_path / "fednested"
    shutil.copytree(ROOT / "fednested", package, ignore=shutil.ignore_patterns("__pycache__"))
    # One edit per dataclass, in its source, as an engineer would make it; nothing else is touched.
    edits = {
        "adapter.py": ("rank: int = field(default=8,", "rank: int = field(default=5,"),
        "training.py": ("default=100, metadata", "default=7, metadata"),
        "retry.py": ("default=8, metadata", "default=3, metadata"),
    }
    for name, (old, new) in edits.items():
        source = package / "config" / name
        text = source.read_text(encoding="utf-8")
        assert text.count(old) == 1, f"{name}: the default to change is not where this test expects it"
        source.write_text(text.replace(old, new), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", CHANGED_DEFAULTS_PROBE, str(package)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == {"model": [5, 7, 3], "partial_section": [5, 7, 3], "sample": [5, 7, 3]}
