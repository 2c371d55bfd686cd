"""The forgetting benchmark at toy scale: one seed, two sequential stages, one federated round, every safeguard."""

import json
from typing import Any

import pytest
import torch

from bench.forgetting import (
    SAFEGUARDS,
    ForgettingBenchSettings,
    most_important_experts,
    run_benchmark,
    safeguard_config,
)

TOY = ForgettingBenchSettings(
    seeds=(0,),
    pretrain_records_per_domain=8,
    heldout_per_domain=3,
    tokenizer_vocab=512,
    pretrain_steps=3,
    devices=2,
    device_records=8,
    seq_len=64,
    rows_per_batch=2,
    sequence=("medical", "legal"),
    stage_steps=2,
    trained_domains=("medical", "legal"),
    rounds=1,
    local_steps=2,
    fisher_records_per_domain=2,
    fisher_max_tokens=128,
    replay_records_per_domain=1,
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "forgetting.json"
    run_benchmark(TOY, out)
    loaded: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return loaded


def test_report_has_both_scenarios_every_safeguard_and_the_headline_keys(report: dict[str, Any]) -> None:
    for scenario in ("sequential", "federated"):
        summary = report["scenarios"][scenario]
        assert set(summary["safeguards"]) == set(SAFEGUARDS)
        assert summary["best_safeguard"] in set(SAFEGUARDS) - {"none"}
        assert report[f"{scenario}_forgetting_reduction_best"] == summary["forgetting_reduction_best"]
        assert isinstance(report[f"{scenario}_new_domain_cost_best"], float)
        none = summary["safeguards"]["none"]
        assert none["new_domain_cost"] == 0.0
        for name, row in summary["safeguards"].items():
            assert len(row["runs"]) == 1, name
            run = row["runs"][0]
            # the report's figures come from the stored per-version losses: base + one version per stage/round
            assert len(run["losses"]) == 1 + (2 if scenario == "sequential" else 1)
            assert run["average_forgetting"] >= 0
            assert row["average_forgetting"]["mean"] == run["average_forgetting"]
        ewc_runs = summary["safeguards"]["ewc"]["runs"]
        assert ewc_runs[0]["ewc_penalty"]
        assert summary["safeguards"]["distillation"]["runs"][0]["distill_loss"]
        assert summary["safeguards"]["freezing"]["runs"][0]["frozen"]
    assert report["machine"]["torch_threads"] == 1
    assert "load_average_at_start" in report["machine"]
    assert "load_average_at_end" in report


def test_freezing_rule_picks_the_experts_with_the_most_fisher_mass() -> None:
    fisher = {
        "model.layers.0.mlp.experts.down_proj": torch.tensor([[[1.0]], [[5.0]], [[0.5]], [[3.0]]]),
        "model.layers.0.mlp.experts.gate_up_proj": torch.tensor([[[1.0]], [[0.0]], [[0.0]], [[0.0]]]),
        "model.layers.1.mlp.experts.down_proj": torch.tensor([[[0.0]], [[0.0]], [[9.0]], [[1.0]]]),
    }
    assert most_important_experts(fisher, 2) == ["0:1", "0:3", "1:2", "1:3"]
    assert safeguard_config("freezing", TOY, ["0:1"]).freeze_experts == ("0:1",)
    with pytest.raises(ValueError, match="unknown safeguard configuration"):
        safeguard_config("magic", TOY, [])
