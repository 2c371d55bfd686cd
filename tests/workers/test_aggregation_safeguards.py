"""A candidate ships its safeguard files: with FEDNESTED_FISHER the Fisher of the candidate's own weights on the
named held-out sets, with FEDNESTED_REPLAY_SET the federation's replay set; both are manifest files, registered and
sha256-checked like the weights (check_store, device verification). A round asking for EWC opens on such a version
and is refused, with the reason, on one without."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured, ValidationError

from apps.federation.choices import TaskKind
from apps.federation.models import TrainingTask
from apps.federation.safeguards import fisher_settings
from apps.registry.management.commands.check_store import check_store
from apps.registry.models import ModelVersion
from fednested.checkpoints import CheckpointError, load_version, verify_version
from fednested.checkpoints.safeguards import REPLAY_FILE_NAME
from fednested.data import TextRecord, write_jsonl
from fednested.messaging import encode
from fednested.training.safeguards import FISHER_FILE_NAME, load_fisher_file, read_fisher_metadata
from tests.federation_world import WorkerWorld, as_message, enroll
from workers.aggregation import aggregate_round_task
from workers.ingest.consumer import ingest_message


def _aggregate(world: WorkerWorld, make_update: Callable[..., Any], capture: Any) -> ModelVersion:
    round_ = world.open_round(k=2)
    with capture(execute=False):
        for index in range(2):
            device = enroll(world, f"car-{index}")
            envelope, _ = make_update(device, seed=index, round_id=round_.round_id)
            assert ingest_message(as_message(encode(envelope), device.row.client_id)).status == "buffered"
        task = TrainingTask.objects.get(kind=TaskKind.EXPERT_AGGREGATION, round=round_)
        version_id = aggregate_round_task(task.pk)
    return ModelVersion.objects.get(version_id=version_id)


def test_a_candidate_ships_the_fisher_of_its_own_weights_and_the_replay_set(
    world: WorkerWorld,
    make_update: Callable[..., Any],
    django_capture_on_commit_callbacks: Any,
    settings: Any,
    tmp_path: Path,
) -> None:
    settings.FEDNESTED_FISHER = json.dumps({"domains": ["medical"], "max_tokens": 256, "seq_len": 64})
    replay = tmp_path / "public.jsonl"
    write_jsonl(replay, [TextRecord(text="a public sentence about the weather"), TextRecord(text="and another")])
    settings.FEDNESTED_REPLAY_SET = str(replay)
    version = _aggregate(world, make_update, django_capture_on_commit_callbacks)
    directory = world.root / "versions" / version.version_id
    model, manifest = load_version(directory, expected_version=version.version_id)
    assert manifest.files[FISHER_FILE_NAME].partition == "safeguards"
    assert manifest.files[REPLAY_FILE_NAME].partition == "safeguards"
    assert (directory / REPLAY_FILE_NAME).read_bytes() == replay.read_bytes()
    assert {artifact.file_name: artifact.partition for artifact in version.artifacts.all()}[FISHER_FILE_NAME] == (
        "safeguards"
    )
    # Of the candidate's weights (what devices train on), on the named domain, within the token budget.
    metadata = read_fisher_metadata(directory / FISHER_FILE_NAME)
    assert metadata["version_id"] == version.version_id
    assert json.loads(metadata["domains"]) == ["medical"]
    assert 0 < int(metadata["tokens"]) <= 256 + 64  # the budget, overshot by at most the row that crossed it
    assert load_fisher_file(directory / FISHER_FILE_NAME, expected_version=version.version_id, model=model)
    assert manifest.lineage["safeguards"]["fisher"]["of_weights"] == version.version_id
    assert not check_store(world.root).errors
    # A Fisher changed after the fact is caught like any version file: by the store check and by every loader.
    fisher = directory / FISHER_FILE_NAME
    data = bytearray(fisher.read_bytes())
    data[-1] ^= 0xFF
    fisher.write_bytes(bytes(data))
    assert [finding.problem.value for finding in check_store(world.root).errors] == ["sha256_mismatch"]
    with pytest.raises(CheckpointError, match=r"fisher\.safetensors.*sha256 mismatch"):
        verify_version(directory)


def test_a_round_asking_for_ewc_needs_a_version_that_ships_a_fisher(
    world: WorkerWorld, make_update: Callable[..., Any], django_capture_on_commit_callbacks: Any, settings: Any
) -> None:
    ewc = {"safeguards": {"ewc_lambda": 2.0}}
    with pytest.raises(ValidationError, match=r"version 'v1' ships no fisher\.safetensors: configure FEDNESTED_FISHER"):
        world.open_round(config=ewc)
    with pytest.raises(ValidationError, match=r"ships no replay\.jsonl: configure FEDNESTED_REPLAY_SET"):
        world.open_round(config={"safeguards": {"replay_fraction": 0.2}})
    with pytest.raises(ValidationError, match=r"safeguards: unknown keys \['ewc'\]"):
        world.open_round(config={"safeguards": {"ewc": 1}})
    settings.FEDNESTED_FISHER = json.dumps({"domains": ["recipes"], "max_tokens": 128, "seq_len": 64})
    candidate = _aggregate(world, make_update, django_capture_on_commit_callbacks)
    world.base = candidate
    assert world.open_round(config=ewc).config == ewc


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("not json", "not JSON"),
        ('{"max_tokens": 10}', "give an object with 'domains'"),
        ('{"domains": []}', "FEDNESTED_FISHER.domains"),
        ('{"domains": "protected", "max_tokens": 0}', "FEDNESTED_FISHER.max_tokens"),
        ('{"domains": ["code"], "max_tokens": 10000000}', "FEDNESTED_FISHER.max_tokens"),
        ('{"domains": ["code"], "seq_len": true}', "FEDNESTED_FISHER.seq_len"),
        ('{"domains": ["code"], "extra": 1}', "give an object with 'domains'"),
    ],
)
def test_a_bad_fisher_setting_is_refused_naming_the_key(raw: str, problem: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=problem):
        fisher_settings(raw)


def test_the_fisher_setting_reads_protected_or_named_domains() -> None:
    assert fisher_settings("") is None
    protected = fisher_settings('{"domains": "protected"}')
    assert protected is not None
    assert protected.domains is None
    assert protected.max_tokens == 8192
    named = fisher_settings('{"domains": ["code", "code", "legal"], "max_tokens": 512, "heldout_dir": "fisher-sets"}')
    assert named is not None
    assert named.domains == ("code", "legal")
    assert named.heldout_dir == "fisher-sets"
