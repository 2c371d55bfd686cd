"""The Tier-1 core update: real DeepSpeed ranks (CPU accelerator, gloo) launched by torchrun on the tiny preset, the
delta arithmetic checked bit for bit, and every bad input refused with a message that says what to fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fednested.checkpoints import save_version
from fednested.checkpoints.safeguards import REPLAY_FILE_NAME
from fednested.checkpoints.versions import load_version, verify_version
from fednested.cli import app
from fednested.config import Tier1Config, Tier1TrainingSettings
from fednested.data import CorpusConfig, generate_corpus, record_texts, train_bpe_tokenizer, write_jsonl
from fednested.data.tokenizer import BpeTokenizerConfig
from fednested.models import build_model
from fednested.partition import partition_model
from fednested.tier1 import CoreUpdateError, CoreUpdateEtas, CoreUpdateResult, combine_core_update, run_core_update
from fednested.tier1.core_update import TRAINED_DELTA_NAME
from fednested.tier1.launcher import prepare_plan
from fednested.tier1.plan import (
    CorePlanError,
    CoreUpdatePlan,
    build_deepspeed_config,
    store_references,
    store_roots,
)
from fednested.training.safeguards import FISHER_FILE_NAME, fisher_shapes, save_fisher_file


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A champion (tiny mixtral), an edge aggregate on top of it, and a Tier-1 dataset with two malformed lines."""
    root = tmp_path_factory.mktemp("tier1")
    corpus = generate_corpus(CorpusConfig(seed=3, train_samples=24, heldout_samples=0))
    texts = [record for domain in corpus.values() for record in domain.records("train")]
    tokenizer = train_bpe_tokenizer(record_texts(texts), BpeTokenizerConfig(vocab_size=384))
    model = build_model("tiny", vocab_size=len(tokenizer), seed=1)
    # the champion ships a Fisher (EWC); a uniform one over the experts except expert 0, which it weighs 1000x
    fisher = {}
    for name, shape in fisher_shapes(model).items():
        if ".mlp.experts." in name:
            fisher[name] = torch.ones(shape)
            fisher[name][0] = 1000.0
    fisher_file = root / "fisher" / FISHER_FILE_NAME
    save_fisher_file(fisher_file, fisher, version_id="v1", domains=["code"], tokens=1)
    # and a replay set (replay, distillation): a few of the records, as the federation's public set would be
    replay_file = root / "fisher" / REPLAY_FILE_NAME
    write_jsonl(replay_file, texts[::6])
    save_version(
        model,
        root / "champion",
        version_id="v1",
        parent_version=None,
        tokenizer=tokenizer,
        safeguard_files={FISHER_FILE_NAME: fisher_file, REPLAY_FILE_NAME: replay_file},
    )
    # a version shipping the champion's Fisher under its own id: a Fisher of another version
    save_version(
        model,
        root / "misfit",
        version_id="misfit",
        parent_version="v1",
        tokenizer=tokenizer,
        safeguard_files={FISHER_FILE_NAME: fisher_file},
    )
    # an edge aggregate changes experts only: shift every fused expert tensor by a known amount
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".mlp.experts." in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 1e-3)
    save_version(model, root / "agg1", version_id="agg1", parent_version="v1", tokenizer=tokenizer)
    data = root / "data" / "tier1.jsonl"
    write_jsonl(data, texts)
    with data.open("a", encoding="utf-8") as stream:
        stream.write("{not json\n")
        stream.write('{"unknown_field": 1}\n')
    return {
        "champion": root / "champion",
        "agg1": root / "agg1",
        "misfit": root / "misfit",
        "data": data,
        "records": len(texts),
        "replay_records": len(texts[::6]),
    }


def _config(world: dict[str, Any], tmp_path: Path, **overrides: Any) -> Tier1Config:
    training = {
        "train_files": [world["data"]],
        "seq_len": 64,
        "rows_per_batch": 2,
        "grad_accum_steps": 2,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "ranks": 2,
        "zero_stage": 2,
        **overrides.pop("training", {}),
    }
    core_update = {
        "champion_dir": world["champion"],
        "output_dir": tmp_path / "versions",
        "eta_core": 0.0,
        "eta_t1": 0.5,
        "eta_t2": 1.0,
        **overrides.pop("core_update", {}),
    }
    return Tier1Config.model_validate(
        {"training": training, "core_update": core_update, "storage": {"checkpoint_dir": tmp_path / "runs"}}
    )


def _leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


# Safeguards on in the main launch (they keep the formula: a frozen tensor or slice has dW_T1 = 0), with weight decay,
# which moves every weight in the optimizer at each step: a frozen expert slice must survive it bitwise. λ is large
# so that EWC visibly holds back expert 0, which the champion's Fisher weighs 1000x.
GUARDED = {
    "ewc_lambda": 100.0,
    "freeze_layers": [0],
    "freeze_experts": ["1:2"],
    "replay_fraction": 0.2,
    "distill_weight": 0.5,
}


@pytest.fixture(scope="module")
def guarded_run(world: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[CoreUpdateResult, Path]:
    """One 2-rank launch with edge aggregates and safeguards, shared by the tests that read its candidate."""
    tmp_path = tmp_path_factory.mktemp("guarded")
    config = _config(world, tmp_path, training={"weight_decay": 0.1}, core_update={"safeguards": GUARDED})
    result = run_core_update(config, edge_base=world["champion"], edge_aggregates=[world["agg1"]], version_id="c1")
    return result, tmp_path


@pytest.mark.slow
def test_two_ranks_write_a_candidate_that_follows_the_formula(
    world: dict[str, Any], guarded_run: tuple[CoreUpdateResult, Path]
) -> None:
    result, tmp_path = guarded_run
    assert result.version_dir == tmp_path / "versions" / "c1"
    assert _leftovers(tmp_path / "versions") == ["c1"]  # no staging directory left behind
    manifest = verify_version(result.version_dir)
    assert manifest.parent_version == "v1"
    candidate, _ = load_version(result.version_dir)
    champion, _ = load_version(world["champion"])
    aggregate, _ = load_version(world["agg1"])
    partition = partition_model(champion)
    trained_delta = load_file(str(result.run_dir / TRAINED_DELTA_NAME))
    new = dict(candidate.named_parameters())
    old = dict(champion.named_parameters())
    edge = dict(aggregate.named_parameters())
    moved = {"core": 0, "expert": 0}
    for name, weight in old.items():
        kind = partition.kind_of_file(name)
        if kind == "core":
            # eta_core = 0: the core is the champion's bit for bit, though it trained
            assert torch.equal(new[name], weight), name
            moved["core"] += int(trained_delta[name].abs().sum() > 0)
        elif kind == "gate":
            # gates were not trained (train_gate false): no delta at all
            assert torch.equal(trained_delta[name], torch.zeros_like(weight)), name
            assert torch.equal(new[name], weight), name
        else:
            expected = weight + 0.5 * trained_delta[name] + 1.0 * (edge[name] - weight)
            assert torch.equal(new[name], expected), name
            moved["expert"] += int(trained_delta[name].abs().sum() > 0)
    assert moved["core"] > 0
    assert moved["expert"] > 0
    # freezing: every tensor of layer 0 and expert 2 of layer 1 did not move by a single bit; its neighbours did
    for name, weight in old.items():
        if name.startswith("model.layers.0."):
            assert torch.equal(trained_delta[name], torch.zeros_like(weight)), name
    for target in ("gate_up_proj", "down_proj"):
        delta = trained_delta[f"model.layers.1.mlp.experts.{target}"]
        assert torch.equal(delta[2], torch.zeros_like(delta[2])), target
        assert delta[1].abs().sum() > 0, target
    # EWC ran: its penalty is positive once the experts moved; distillation ran against the champion
    assert result.metrics["ewc_penalty_last"] > 0
    assert result.metrics["distill_loss_last"] > 0
    # replay: round(0.2 * n / 0.8) of the champion's replay records mixed into the n training records
    assert result.metrics["replay_records"] == round(0.2 * world["records"] / 0.8)

    lineage = result.lineage
    assert lineage["kind"] == "core_update"
    assert lineage["champion"]["version_id"] == "v1"
    [dataset] = lineage["datasets"]
    assert dataset["sha256"] == _sha256(world["data"])
    assert dataset["bad_lines"] == 2
    assert dataset["records"] == world["records"]
    assert lineage["deepspeed"]["ranks"] == 2
    assert lineage["deepspeed"]["backend"] == "gloo"
    assert lineage["deepspeed"]["config"]["zero_optimization"]["stage"] == 2
    assert lineage["deepspeed"]["config"]["train_batch_size"] == 2 * 2 * 2
    assert lineage["edge_aggregates"] == [{"version_id": "agg1", "parent_version": "v1", "path": str(world["agg1"])}]
    assert lineage["etas"] == {"core": 0.0, "t1": 0.5, "t2": 1.0}
    safeguards = lineage["safeguards_applied"]
    assert safeguards["config"]["ewc_lambda"] == 100.0
    assert safeguards["ewc"]["lambda"] == 100.0
    assert safeguards["ewc"]["penalty_last"] == result.metrics["ewc_penalty_last"]
    assert safeguards["ewc"]["fisher"]["sha256"] == _sha256(world["champion"] / FISHER_FILE_NAME)
    assert "model.layers.0.self_attn.q_proj.weight" in safeguards["frozen_tensors"]
    assert ["model.layers.1.mlp.experts.down_proj", 2] in safeguards["frozen_slices"]
    replay_sha256 = _sha256(world["champion"] / REPLAY_FILE_NAME)
    assert safeguards["replay"]["file"]["sha256"] == replay_sha256
    assert safeguards["replay"]["records_mixed"] == result.metrics["replay_records"]
    assert safeguards["distillation"]["loss_last"] == result.metrics["distill_loss_last"]
    assert safeguards["distillation"]["temperature"] == 2.0
    assert result.metrics["steps"] == 3
    assert len(result.metrics["loss_curve"]) == 3
    assert (result.run_dir / "rank-0.log").is_file()
    assert (result.run_dir / "rank-1.log").is_file()


@pytest.mark.slow
def test_ewc_holds_the_weights_its_fisher_weighs_closer_to_the_champion(
    world: dict[str, Any], guarded_run: tuple[CoreUpdateResult, Path], tmp_path: Path
) -> None:
    """The same launch without EWC (same seed, data order and freezing): expert 0, which the Fisher weighs 1000x,
    moves less with the penalty than without it."""
    with_ewc, _ = guarded_run
    config = _config(
        world, tmp_path, training={"weight_decay": 0.1}, core_update={"safeguards": {**GUARDED, "ewc_lambda": 0.0}}
    )
    without = run_core_update(config, version_id="c-no-ewc")
    assert without.metrics["ewc_penalty_last"] is None
    assert without.lineage["safeguards_applied"]["ewc"] is None
    held = load_file(str(with_ewc.run_dir / TRAINED_DELTA_NAME))
    free = load_file(str(without.run_dir / TRAINED_DELTA_NAME))
    for target in ("gate_up_proj", "down_proj"):
        name = f"model.layers.1.mlp.experts.{target}"
        moved_free = float(free[name][0].abs().mean())
        assert moved_free > 0, name  # expert 0 trains at all, so holding it back is measurable
        assert float(held[name][0].abs().mean()) < 0.5 * moved_free, name


@pytest.mark.slow
def test_a_rank_that_crashes_fails_the_run_with_its_log_and_leaves_no_version(
    world: dict[str, Any], tmp_path: Path
) -> None:
    config = _config(
        world,
        tmp_path,
        training={"max_steps": 3, "zero_stage": 1},
        core_update={"fault_injection": {"rank": 1, "after_step": 1}},
    )
    with pytest.raises(CoreUpdateError) as caught:
        run_core_update(config, version_id="c2")
    message = str(caught.value)
    assert "rank 1 crashed" in message
    assert "InjectedFault" in message
    assert "raises after step 1" in caught.value.log_tail
    assert "Traceback" in caught.value.log_tail
    assert _leftovers(tmp_path / "versions") == []
    assert _leftovers(tmp_path / "runs") == []


@pytest.mark.parametrize(
    ("overrides", "extra_json", "expected"),
    [
        ({"training": {"ranks": 2}}, {"train_batch_size": 5}, "train_batch_size 5 != train_micro_batch_size_per_gpu 2"),
        ({}, {"zero_optimization": {"stage": 3}}, "ZeRO stage 3 is not supported"),
        ({"training": {"offload_optimizer": True}}, None, "offload needs a CUDA accelerator"),
        ({}, {"optimizer": {"type": "Adam"}}, "sets 'optimizer'"),
        ({}, {"fp16": {"enabled": True}}, "fp16 is not supported on the CPU accelerator"),
        ({"core_update": {"fault_injection": {"rank": 5, "after_step": 0}}}, None, "rank 5 does not exist"),
    ],
)
def test_a_deepspeed_config_that_cannot_work_is_refused_before_training(
    world: dict[str, Any], tmp_path: Path, overrides: dict[str, Any], extra_json: dict[str, Any] | None, expected: str
) -> None:
    if extra_json is not None:
        extra = tmp_path / "ds.json"
        extra.write_text(json.dumps(extra_json))
        overrides.setdefault("training", {})["deepspeed_config"] = extra
    config = _config(
        world, tmp_path, core_update={"accelerator": "cpu", **overrides.pop("core_update", {})}, **overrides
    )
    with pytest.raises(CoreUpdateError, match="refused before training") as caught:
        run_core_update(config, version_id="bad")
    assert expected in str(caught.value)
    assert _leftovers(tmp_path / "versions") == []


def test_missing_and_corrupt_datasets_are_refused_naming_the_file(world: dict[str, Any], tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    config = _config(world, tmp_path, training={"train_files": [world["data"], missing]})
    with pytest.raises(CoreUpdateError, match=f"dataset {missing} does not exist"):
        run_core_update(config)
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_bytes(b"\x00\xff\xfe garbage\n{broken\n")
    config = _config(world, tmp_path, training={"train_files": [corrupt]})
    with pytest.raises(
        CoreUpdateError, match=r"corrupt\.jsonl is corrupt: no valid record in 2 line\(s\), 2 malformed"
    ):
        run_core_update(config)
    assert _leftovers(tmp_path / "versions") == []


def test_edge_aggregates_must_chain_from_the_base(world: dict[str, Any], tmp_path: Path) -> None:
    config = _config(world, tmp_path)
    with pytest.raises(CoreUpdateError, match="has parent 'v1', expected 'agg1'"):
        run_core_update(config, edge_base=world["agg1"], edge_aggregates=[world["agg1"]])


def test_combine_applies_each_eta_to_its_partition() -> None:
    champion = {"core.w": torch.tensor([1.0, 2.0]), "exp.w": torch.tensor([1.0, 1.0]), "gate.w": torch.tensor([0.5])}
    trained = {"core.w": torch.tensor([2.0, 0.0]), "exp.w": torch.tensor([3.0, 1.0]), "gate.w": torch.tensor([1.5])}
    kinds = {"core.w": "core", "exp.w": "expert", "gate.w": "gate"}
    edges = {"exp.w": torch.tensor([0.25, -0.5])}
    out = combine_core_update(champion, trained, kinds, edges, CoreUpdateEtas(core=0.5, t1=0.25, t2=2.0))  # type: ignore[arg-type]
    assert out["core.w"].tolist() == [1.5, 1.0]  # 1 + 0.5*1, 2 + 0.5*-2
    assert out["exp.w"].tolist() == [2.0, 0.0]  # 1 + 0.25*2 + 2*0.25, 1 + 0 + 2*-0.5
    assert out["gate.w"].tolist() == [0.75]  # gates move with eta_t1
    with pytest.raises(ValueError, match="only hold expert tensors"):
        combine_core_update(champion, trained, kinds, {"core.w": torch.zeros(2)}, CoreUpdateEtas())  # type: ignore[arg-type]


def test_cli_reports_a_refused_run_and_exits_1(world: dict[str, Any], tmp_path: Path) -> None:
    config_path = tmp_path / "tier1.yaml"
    config_path.write_text(
        f"kind: tier1\ntraining:\n  train_files: [{tmp_path / 'absent.jsonl'}]\n"
        f"core_update:\n  champion_dir: {world['champion']}\n  output_dir: {tmp_path / 'versions'}\n"
    )
    result = CliRunner().invoke(app, ["tier1", "core-update", "--config", str(config_path)])
    assert result.exit_code == 1, result.output
    assert "absent.jsonl does not exist" in result.stderr


def test_the_deepspeed_config_follows_the_tier1_settings(tmp_path: Path) -> None:
    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "communication_data_type": "fp32"}))
    training = Tier1TrainingSettings(
        rows_per_batch=3,
        grad_accum_steps=4,
        ranks=2,
        zero_stage=1,
        offload_optimizer=True,
        max_grad_norm=0.5,
        learning_rate=2e-4,
        weight_decay=0.1,
        deepspeed_config=extra,
    )
    config = build_deepspeed_config(training, accelerator="cuda", precision="bf16")
    assert config["train_batch_size"] == 24
    assert config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": True}
    # the extra JSON merges into a section instead of replacing it
    assert config["zero_optimization"] == {
        "stage": 1,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "overlap_comm": True,
    }
    assert config["communication_data_type"] == "fp32"
    # ZeRO-Offload steps DeepSpeed's own AdamW (DeepSpeedCPUAdam), built from the tier1 learning rate and decay
    assert config["optimizer"] == {"type": "AdamW", "params": {"lr": 2e-4, "weight_decay": 0.1}}
    with pytest.raises(CorePlanError, match="offload needs a CUDA accelerator"):
        build_deepspeed_config(training, accelerator="cpu", precision="fp32")


@pytest.mark.parametrize(
    ("champion", "expected"),
    [
        ("agg1", "champion 'agg1'"),  # ships no Fisher at all
        ("misfit", "estimated for version 'v1', this model is version 'misfit'"),
    ],
)
def test_ewc_without_the_champions_own_fisher_is_refused_before_training(
    world: dict[str, Any], tmp_path: Path, champion: str, expected: str
) -> None:
    config = _config(world, tmp_path, core_update={"champion_dir": world[champion], "safeguards": {"ewc_lambda": 1.0}})
    with pytest.raises(CoreUpdateError, match="refused before training") as caught:
        run_core_update(config, version_id="ewc")
    assert expected in str(caught.value)
    assert _leftovers(tmp_path / "versions") == []
    assert _leftovers(tmp_path / "runs") == []


@pytest.mark.parametrize(
    ("safeguards", "expected"),
    [
        ({"freeze_layers": [2]}, "freeze_layers names layer 2; the champion has decoder layers 0..1"),
        ({"freeze_experts": ["1:4"]}, "freeze_experts names '1:4'"),
        ({"replay_fraction": 0.2}, "replay_fraction is 0.2 but the champion 'agg1'"),
        ({"distill_weight": 1.0}, "distill_weight is 1.0 but the champion 'agg1'"),
    ],
)
def test_safeguards_that_cannot_run_are_refused_before_training(
    world: dict[str, Any], tmp_path: Path, safeguards: dict[str, Any], expected: str
) -> None:
    # agg1 ships no safeguard files: replay and distillation have no replay set there
    config = _config(world, tmp_path, core_update={"champion_dir": world["agg1"], "safeguards": safeguards})
    with pytest.raises(CoreUpdateError, match="refused before training") as caught:
        run_core_update(config, version_id="guarded")
    assert expected in str(caught.value)


def test_the_plan_resolves_frozen_gates_layers_and_expert_slices(world: dict[str, Any], tmp_path: Path) -> None:
    config = _config(
        world,
        tmp_path,
        training={"train_gate": True},
        core_update={"safeguards": {"freeze_gate": True, "freeze_layers": [1], "freeze_experts": ["0:3", "1:0"]}},
    )
    plan = prepare_plan(config, staging=tmp_path, version_id="p", edge_base=None, edge_aggregates=[])
    assert plan.safeguards is not None
    frozen = set(plan.safeguards.frozen_tensors)
    assert "model.layers.0.mlp.gate.weight" in frozen  # freeze_gate, though train_gate is on
    assert {name for name in frozen if name.startswith("model.layers.1.")} == {
        name for name, _ in load_version(world["champion"])[0].named_parameters() if name.startswith("model.layers.1.")
    }
    assert "model.layers.0.self_attn.q_proj.weight" not in frozen
    # expert 0 of layer 1 is inside a frozen layer already: only layer 0's expert 3 is a slice
    assert plan.safeguards.frozen_slices == [
        ("model.layers.0.mlp.experts.down_proj", 3),
        ("model.layers.0.mlp.experts.gate_up_proj", 3),
    ]
    assert plan.safeguards.fisher_path is None
    assert CoreUpdatePlan.from_json(plan.to_json()) == plan


def test_a_plan_for_the_store_names_its_files_store_relative_and_refuses_files_outside(
    world: dict[str, Any], tmp_path: Path
) -> None:
    config = _config(world, tmp_path)
    store = world["champion"].parent
    plan = prepare_plan(
        config, staging=tmp_path, version_id="p", edge_base=None, edge_aggregates=[], lineage_store=store
    )
    assert plan.lineage_roots == store_roots(store)
    champion = {"path": plan.champion_dir, "datasets": [entry.path for entry in plan.datasets], "steps": 3}
    assert store_references(champion, plan.lineage_roots) == {
        "path": "artifacts://champion",
        "datasets": ["artifacts://data/tier1.jsonl"],
        "steps": 3,
    }
    # A sibling folder whose name starts like the store's is not inside it.
    assert store_references(f"{store}-old/x", plan.lineage_roots) == f"{store}-old/x"
    assert CoreUpdatePlan.from_json(plan.to_json()) == plan
    with pytest.raises(CorePlanError, match=r"lie\(s\) outside the artifact store") as caught:
        prepare_plan(
            config, staging=tmp_path, version_id="p", edge_base=None, edge_aggregates=[], lineage_store=tmp_path
        )
    assert str(world["data"]) in str(caught.value)
    # The CLI (no store) keeps the paths it was given.
    assert (
        prepare_plan(config, staging=tmp_path, version_id="p", edge_base=None, edge_aggregates=[]).lineage_roots == []
    )


def test_cli_decides_each_dataset_by_policy_before_reading_it(world: dict[str, Any], tmp_path: Path) -> None:
    """`core_update.dataset_policies` in the config: a denied dataset stops the run before any file is read (the
    denied one does not even exist), naming the deciding policy; a policy file that is not Ranger JSON stops it too."""
    store = tmp_path / "store"
    (store / "datasets").mkdir(parents=True)
    allowed = store / "datasets" / "tier1.jsonl"
    allowed.write_bytes(world["data"].read_bytes())
    policies = tmp_path / "policies.json"
    policies.write_text(
        json.dumps(
            [
                {
                    "id": 3,
                    "name": "tier1-read",
                    "resources": {"dataset": {"values": ["/datasets"], "isRecursive": True}},
                    "policyItems": [{"accesses": [{"type": "read"}], "users": ["svc-a"], "groups": ["ml"]}],
                    "denyPolicyItems": [{"accesses": [{"type": "read"}], "users": ["svc-a"]}],
                    "denyExceptions": [{"accesses": [{"type": "read"}], "roles": ["curator"]}],
                }
            ]
        )
    )

    def run(principal: str, roles: list[str], files: list[Path]) -> Any:
        config_path = tmp_path / "tier1.yaml"
        config_path.write_text(
            json.dumps(
                {
                    "kind": "tier1",
                    "training": {"train_files": [str(path) for path in files], "max_steps": 1},
                    "core_update": {
                        "champion_dir": str(world["champion"]),
                        "output_dir": str(tmp_path / "versions"),
                        "dataset_policies": str(policies),
                        "principal": principal,
                        "principal_roles": roles,
                        "fault_injection": {"rank": 3, "after_step": 0},  # refused right after the datasets
                    },
                    "storage": {"artifact_root": str(store), "checkpoint_dir": str(tmp_path / "runs")},
                }
            )
        )
        return CliRunner().invoke(app, ["tier1", "core-update", "--config", str(config_path)])

    absent = store / "datasets" / "absent.jsonl"
    denied = run("svc-a", [], [allowed, absent])
    assert denied.exit_code == 1, denied.output
    assert "dataset access denied before reading" in denied.stderr
    assert "/datasets/tier1.jsonl: policy 3 'tier1-read' denyPolicyItems[0] denies read" in denied.stderr
    assert "does not exist" not in denied.stderr
    # svc-a as a curator: the deny exception lifts the deny, the allow item (its user) allows; the run goes on to
    # the next check (the datasets were read), which refuses the fault injection's rank
    excepted = run("svc-a", ["curator"], [allowed])
    assert excepted.exit_code == 1, excepted.output
    assert "fault_injection.rank 3 does not exist" in excepted.stderr
    policies.write_text('{"policies": [{"name": "x", "policyItems": [{"accesses": [{"type": "delete"}]}]}]}')
    broken = run("svc-a", [], [allowed])
    assert broken.exit_code == 1
    assert "core_update.dataset_policies:" in broken.stderr
    assert "policies.json: $.policies[0].resources: expected an object, got null" in broken.stderr
    assert _leftovers(tmp_path / "versions") == []
