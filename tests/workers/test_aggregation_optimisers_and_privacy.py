"""Server optimisers, differential privacy and duplicate updates in the aggregation worker, on PostgreSQL and a real
artifact store: the optimiser's state follows the line of champions, noise is really added and accounted, the ε
budget stops rounds before they start and windows before they release, and one update counts once whoever sends it."""

import math
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import torch
from django.core.exceptions import ValidationError
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from apps.accounts.choices import Role
from apps.accounts.models import User
from apps.federation.choices import RoundMode, RoundStatus, TaskKind, UpdateStatus
from apps.federation.models import Round, TrainingTask, Update
from apps.federation.services import open_round
from apps.governance.models import AuditEvent
from apps.governance.services import approve_version, request_approval
from apps.registry.choices import CHAMPION_ALIAS
from apps.registry.management.commands.check_store import check_store
from apps.registry.models import ModelVersion
from apps.registry.services import move_alias
from apps.registry.storage import artifact_path
from fednested.adapters.lora import adapter_key
from fednested.aggregation.privacy import epsilon_for
from fednested.aggregation.server_optimizers import load_server_state
from fednested.checkpoints import file_sha256, load_version
from fednested.messaging import encode
from tests.federation_world import (
    ADAPTER,
    LAYER0_DOWN,
    LAYER1_UP,
    WorkerWorld,
    as_message,
    enroll,
    random_adapters,
)
from workers.aggregation import aggregate_round_task, candidate_version_id
from workers.ingest.consumer import ingest_message

MakeUpdate = Callable[..., Any]


def dense(adapters: dict[str, torch.Tensor], param: str, expert: int) -> torch.Tensor:
    lora_a, lora_b = adapters[adapter_key(param, expert, "lora_A")], adapters[adapter_key(param, expert, "lora_B")]
    return ADAPTER.scale * lora_b @ lora_a


def send(
    world: WorkerWorld,
    make_update: MakeUpdate,
    capture: Any,
    clients: list[str],
    *,
    seeds: list[int],
    round_id: str | None = None,
    adapters: list[dict[str, torch.Tensor] | None] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Each client sends one update (its adapters drawn from its seed, or given) and it is buffered."""
    sent = []
    with capture(execute=False):
        for index, client in enumerate(clients):
            device = enroll(world, client)
            given = adapters[index] if adapters else None
            envelope, tensors = make_update(
                device,
                seed=seeds[index],
                round_id=round_id,
                routed_tokens={"0.1": 20, "1.2": 20},
                **({"adapters": given} if given is not None else {}),
            )
            outcome = ingest_message(as_message(encode(envelope), device.row.client_id))
            assert outcome.status == "buffered", outcome
            sent.append(tensors)
    return sent


def promote(world: WorkerWorld, version: ModelVersion) -> None:
    officer = User.objects.get_or_create(username="olga-officer", defaults={"role": Role.OFFICER})[0]
    approve_version(request_approval(version, actor=world.engineer), actor=officer, reason="reviewed in a test")


def aggregate(round_: Round, capture: Any) -> ModelVersion:
    task = TrainingTask.objects.filter(kind=TaskKind.EXPERT_AGGREGATION, round=round_).latest("pk")
    with capture(execute=False):
        version_id = aggregate_round_task(task.pk)
    assert version_id == candidate_version_id(round_)
    return ModelVersion.objects.get(version_id=version_id)


def weights(version: ModelVersion, world: WorkerWorld) -> dict[str, torch.Tensor]:
    model, _ = load_version(world.root / "versions" / version.version_id)
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def adam_step(delta: torch.Tensor, *, eta: float, beta1: float, beta2: float, tau: float) -> torch.Tensor:
    """The first FedAdam step by hand (Reddi et al. 2021, Algorithm 2): m = (1-β1)Δ, v = β2·τ² + (1-β2)Δ²."""
    m = (1 - beta1) * delta
    v = beta2 * tau * tau + (1 - beta2) * delta * delta
    return eta * m / (v.sqrt() + tau)


FEDADAM = {"server_optimizer": "fedadam", "server_learning_rate": 0.01, "server_tau": 0.01, "max_update_share": None}


def test_fedadam_state_is_kept_with_each_candidate_and_continued_by_the_next_window(
    world: WorkerWorld, make_update: MakeUpdate, django_capture_on_commit_callbacks: Any
) -> None:
    round_ = world.open_round(k=2, config=FEDADAM)
    sent = send(world, make_update, django_capture_on_commit_callbacks, ["car-0", "car-1"], seeds=[0, 1])
    first = aggregate(round_, django_capture_on_commit_callbacks)
    before, after = weights(world.base, world), weights(first, world)
    mean = 0.5 * dense(sent[0], LAYER0_DOWN, 1) + 0.5 * dense(sent[1], LAYER0_DOWN, 1)
    expected = adam_step(mean, eta=0.01, beta1=0.9, beta2=0.99, tau=0.01)
    torch.testing.assert_close(after[LAYER0_DOWN][1] - before[LAYER0_DOWN][1], expected, rtol=1e-4, atol=1e-7)

    optimizer = first.manifest["lineage"]["aggregation"]["server_optimizer"]
    assert (optimizer["name"], optimizer["resumed_from"]) == ("fedadam", None)
    state_file = artifact_path(optimizer["state"]["uri"], world.root)
    assert state_file == world.root / "server-state" / f"{first.version_id}.safetensors"
    assert file_sha256(state_file) == optimizer["state"]["sha256"]
    state = load_server_state(state_file, expected_version=first.version_id, sha256=optimizer["state"]["sha256"])
    key = f"{LAYER0_DOWN}/expert=1"
    assert state.steps[key] == 1
    torch.testing.assert_close(state.moments[f"{key}#m"], 0.1 * mean)
    # Devices never download it: it is not among the version's files.
    assert not first.artifacts.filter(file_name__contains="server").exists()
    report = check_store(world.root)
    assert report.errors == []
    assert not [f for f in report.findings if "server-state" in f.location]

    # Promoted, the candidate's state is what the next window of the series continues.
    promote(world, first)
    following = Round.objects.get(series=round_.series, sequence=2)
    send(world, make_update, django_capture_on_commit_callbacks, ["car-2", "car-3"], seeds=[2, 3])
    second = aggregate(following, django_capture_on_commit_callbacks)
    optimizer = second.manifest["lineage"]["aggregation"]["server_optimizer"]
    assert optimizer["resumed_from"] == first.version_id
    assert optimizer["resumed"] is True
    resumed = load_server_state(
        artifact_path(optimizer["state"]["uri"], world.root),
        expected_version=second.version_id,
        sha256=optimizer["state"]["sha256"],
    )
    assert resumed.steps[key] == 2


def test_an_unusable_state_file_costs_the_warm_up_not_the_window(
    world: WorkerWorld, make_update: MakeUpdate, django_capture_on_commit_callbacks: Any
) -> None:
    round_ = world.open_round(k=2, config=FEDADAM)
    send(world, make_update, django_capture_on_commit_callbacks, ["car-0", "car-1"], seeds=[0, 1])
    first = aggregate(round_, django_capture_on_commit_callbacks)
    promote(world, first)
    # The champion's state file replaced by another version's (a restore from the wrong backup, say).
    following = Round.objects.get(series=round_.series, sequence=2)
    send(world, make_update, django_capture_on_commit_callbacks, ["car-2", "car-3"], seeds=[2, 3])
    second = aggregate(following, django_capture_on_commit_callbacks)
    first_state = world.root / "server-state" / f"{first.version_id}.safetensors"
    second_state = world.root / "server-state" / f"{second.version_id}.safetensors"
    first_state.write_bytes(second_state.read_bytes())
    promote(world, second)
    # Rolled back to the first candidate, whose state file is now the wrong one.
    move_alias(name=CHAMPION_ALIAS, version=first, actor=world.engineer)

    third_window = Round.objects.get(series=round_.series, sequence=3)
    send(world, make_update, django_capture_on_commit_callbacks, ["car-4", "car-5"], seeds=[4, 5])
    third = aggregate(third_window, django_capture_on_commit_callbacks)
    optimizer = third.manifest["lineage"]["aggregation"]["server_optimizer"]
    assert optimizer["resumed_from"] is None
    assert f"the state {first.version_id} left could not be used" in optimizer["note"]
    assert f"the lineage of {first.version_id} says" in optimizer["note"]
    assert str(world.root) not in optimizer["note"]
    assert set(Update.objects.values_list("status", flat=True)) == {UpdateStatus.APPLIED}
    # The store check names the altered file.
    problems = [finding for finding in check_store(world.root).errors if "server optimiser state" in finding.owner]
    assert [finding.location for finding in problems] == [f"server-state/{first.version_id}.safetensors"]


DP = {"noise_multiplier": 1.0, "clip_norm": 0.05}


def test_a_private_window_adds_the_noise_it_claims_and_accounts_epsilon(
    world: WorkerWorld, make_update: MakeUpdate, django_capture_on_commit_callbacks: Any
) -> None:
    round_ = world.open_round(k=2, config={"dp": DP, "max_update_share": None})
    sent = send(world, make_update, django_capture_on_commit_callbacks, ["car-0", "car-1"], seeds=[0, 1])
    candidate = aggregate(round_, django_capture_on_commit_callbacks)
    before, after = weights(world.base, world), weights(candidate, world)
    norms = [
        math.sqrt(sum(float(dense(tensors, p, e).square().sum()) for p, e in ((LAYER0_DOWN, 1), (LAYER1_UP, 2))))
        for tensors in sent
    ]
    assert all(norm > DP["clip_norm"] for norm in norms)  # both are clipped to C
    noiseless = sum(
        dense(tensors, LAYER0_DOWN, 1) * (DP["clip_norm"] / norm) for tensors, norm in zip(sent, norms, strict=True)
    ) / len(sent)
    noise = (after[LAYER0_DOWN][1] - before[LAYER0_DOWN][1]) - noiseless
    std = DP["noise_multiplier"] * DP["clip_norm"] / 2
    assert abs(float(noise.std()) - std) < 0.15 * std
    # Noise on an expert no update carried too: which experts were trained is not revealed.
    untouched = after[LAYER0_DOWN][0] - before[LAYER0_DOWN][0]
    assert abs(float(untouched.std()) - std) < 0.15 * std

    privacy = candidate.manifest["lineage"]["aggregation"]["privacy"]
    assert privacy["epsilon"] == pytest.approx(epsilon_for([1.0], 1e-5))
    assert (privacy["noised_aggregations"], privacy["unprotected_aggregations"], privacy["contributors"]) == (1, 0, 2)
    assert (privacy["clipped_updates"], privacy["noise_drawn"]) == (2, True)
    # Nothing published says how large an update was or which noise was drawn.
    published = str(candidate.manifest) + str(Round.objects.get(pk=round_.pk).record)
    for private in ("'norms'", "'clipped'", "noise_rms_drawn", "'scaled'"):
        assert private not in published

    api = APIClient()
    api.force_authenticate(world.engineer)
    body = api.get(f"/api/v1/versions/{candidate.version_id}/").json()
    assert body["aggregation"]["dp_noised"] is True
    assert body["aggregation"]["privacy"]["epsilon"] == pytest.approx(privacy["epsilon"])
    assert body["aggregation"]["server_optimizer"]["name"] == "fedavgm"  # the default
    base = api.get(f"/api/v1/versions/{world.base.version_id}/").json()
    assert base["aggregation"] is None
    ledger = api.get("/api/v1/privacy/").json()
    assert (ledger["noised_aggregations"], ledger["unprotected_aggregations"]) == (1, 0)
    assert ledger["epsilon"] == pytest.approx(privacy["epsilon"])
    assert api.get("/api/v1/privacy/?delta=1e-3").json()["epsilon"] < ledger["epsilon"]
    assert api.get("/api/v1/privacy/?delta=2").status_code == 400

    officer = User.objects.create(username="oscar-officer", role=Role.OFFICER)
    client = Client()
    client.force_login(officer)
    page = client.get(reverse("console:version-detail", args=[candidate.version_id])).content.decode()
    assert f"ε = {privacy['epsilon']:.3f} at δ = 0.00001 over 1 noised aggregation" in page
    assert "2 of 2 updates clipped" in page


def test_a_round_whose_plan_exceeds_the_budget_refuses_to_start_and_says_by_how_much(world: WorkerWorld) -> None:
    planned = {"dp": DP | {"epsilon_budget": 8.0, "planned_aggregations": 3}}
    with pytest.raises(ValidationError) as refused:
        world.open_round(k=2, config=planned)
    message = " ".join(refused.value.messages)
    after_three = epsilon_for([1.0] * 3, 1e-5)
    assert f"{after_three:.2f}" in message
    assert f"exceeded by {after_three - 8.0:.2f}" in message
    assert not Round.objects.exists()
    for bad, expected in (
        ({"clip_norm": 1.0}, "noise_multiplier"),
        ({"noise_multiplier": 0, "clip_norm": 1.0}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "clip_norm": -1}, "clip_norm"),
    ):
        with pytest.raises(ValidationError, match=expected):
            world.open_round(k=2, config={"dp": bad})


def test_a_spent_budget_cancels_the_window_before_release_and_stops_the_series(
    world: WorkerWorld, make_update: MakeUpdate, django_capture_on_commit_callbacks: Any
) -> None:
    budget = {"dp": DP | {"epsilon_budget": 5.0}}  # one aggregation at z=1 is ε≈4.73, two are ≈7.08
    devices = [enroll(world, f"car-{index}") for index in range(4)]
    # Both rounds fit the budget when they open; only one of them can be released.
    rounds = [
        open_round(
            base_version=world.base,
            buffer_size_k=2,
            deadline_at=timezone.now() + timedelta(hours=1),
            actor=world.engineer,
            config=budget,
            mode=RoundMode.SYNC,
            cohort=[device.row for device in devices[2 * index : 2 * index + 2]],
        )
        for index in range(2)
    ]

    def report(index: int) -> None:
        with django_capture_on_commit_callbacks(execute=False):
            for seed, device in enumerate(devices[2 * index : 2 * index + 2], start=2 * index):
                envelope, _ = make_update(device, seed=seed, round_id=rounds[index].round_id)
                assert ingest_message(as_message(encode(envelope), device.row.client_id)).status == "buffered"

    report(0)
    promote(world, aggregate(rounds[0], django_capture_on_commit_callbacks))
    report(1)
    task = TrainingTask.objects.filter(kind=TaskKind.EXPERT_AGGREGATION, round=rounds[1]).latest("pk")
    with django_capture_on_commit_callbacks(execute=False):
        assert aggregate_round_task(task.pk) is None
    refused = Round.objects.get(pk=rounds[1].pk)
    assert refused.status == RoundStatus.CANCELLED
    assert not ModelVersion.objects.filter(version_id=candidate_version_id(refused)).exists()
    late = Update.objects.filter(round=refused)
    assert {(update.status, update.rejection_code) for update in late} == {
        (UpdateStatus.REJECTED, "privacy_budget_spent")
    }
    assert all("exceeded by" in update.rejection_message for update in late)

    # An asynchronous series stops instead of opening a window it could never release: with one noised
    # aggregation spent, ε is 7.08 after its first window and would be 9.01 after a second.
    series = world.open_round(k=2, config={"dp": DP | {"epsilon_budget": 8.0}})
    send(world, make_update, django_capture_on_commit_callbacks, ["car-8", "car-9"], seeds=[8, 9])
    aggregate(series, django_capture_on_commit_callbacks)
    assert not Round.objects.filter(series=series.round_id, sequence=2).exists()
    assert "exceeded by 1.01" in Round.objects.get(pk=series.pk).record["series_stopped"]
    assert AuditEvent.objects.filter(verb="federation.series.stopped", data__series=series.round_id).exists()


def test_the_same_update_sent_from_several_devices_counts_once(
    world: WorkerWorld, make_update: MakeUpdate, django_capture_on_commit_callbacks: Any
) -> None:
    round_ = world.open_round(k=3, config={"max_update_share": None})
    honest, poisoned = (random_adapters(world.shapes, {LAYER0_DOWN: [1], LAYER1_UP: [2]}, seed) for seed in (0, 7))
    poisoned = {name: tensor * (10.0 if "lora_B" in name else 1.0) for name, tensor in poisoned.items()}
    sent = send(
        world,
        make_update,
        django_capture_on_commit_callbacks,
        ["honest", "sybil-1", "sybil-2"],
        seeds=[0, 0, 0],
        adapters=[honest, poisoned, {name: tensor.clone() for name, tensor in poisoned.items()}],
    )
    candidate = aggregate(round_, django_capture_on_commit_callbacks)
    copy = Update.objects.get(device__client_id="sybil-2")
    assert (copy.status, copy.rejection_code) == (UpdateStatus.REJECTED, "duplicate_update")
    first = Update.objects.get(device__client_id="sybil-1")
    assert f"identical to update {first.update_id} from device 'sybil-1' in this window" in copy.rejection_message
    before, after = weights(world.base, world), weights(candidate, world)
    expected = 0.5 * dense(sent[0], LAYER0_DOWN, 1) + 0.5 * dense(sent[1], LAYER0_DOWN, 1)
    torch.testing.assert_close(after[LAYER0_DOWN][1] - before[LAYER0_DOWN][1], expected, rtol=1e-4, atol=1e-6)

    # Sent again later, from yet another device, it is recognised as applied already.
    promote(world, candidate)
    following = Round.objects.get(series=round_.series, sequence=2)
    send(
        world,
        make_update,
        django_capture_on_commit_callbacks,
        ["sybil-3", "fresh-1", "fresh-2"],
        seeds=[0, 5, 6],
        adapters=[poisoned, None, None],
    )
    aggregate(following, django_capture_on_commit_callbacks)
    late = Update.objects.get(device__client_id="sybil-3")
    assert late.rejection_code == "duplicate_update"
    assert f"identical to update {first.update_id}, applied earlier" in late.rejection_message
