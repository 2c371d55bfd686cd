"""Anti-forgetting safeguards measured: how much of the forgetting of earlier domains each one removes, and what it
costs the domain being learnt.

`make bench-forgetting` writes bench/results/forgetting.json. The world is bench/asynchronous.py's (generated
corpus, BPE, `tiny` base pre-trained briefly on every domain). Two scenarios, each run with no safeguard, EWC,
distillation, expert freezing and the combination, on 3 seeds:

- sequential: one model learns three domains one after the other (fresh expert LoRA per stage, merged in); the
  parent version's Fisher is estimated on the domains the stage does not train;
- federated: the demo's scenario: single-domain devices of three domains train every round on the server model,
  their updates are weighted and combined per expert (`fednested.aggregation`) and merged; the two untrained domains
  are the protected ones the server estimates each version's Fisher on.

Every version's per-domain held-out loss goes into `fednested.evaluation.forgetting.forgetting_report`; average
forgetting and BWT are the final version's. Docs: docs/benchmarks/forgetting.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.asynchronous import World, build_world
from bench.federated import spread
from bench.report import machine as machine_info
from bench.report import write_report
from edge_client.local_training import count_routed_tokens
from fednested.adapters import ExpertLoraConfig, adapter_state_dict, attach_expert_adapters
from fednested.aggregation.aggregate import AggregationConfig, expert_of_delta
from fednested.aggregation.factored import aggregate_factored
from fednested.aggregation.factors import AdapterFactors
from fednested.aggregation.weights import UpdateFacts, bounded_expert_weights
from fednested.config.training import SafeguardConfig
from fednested.data import Record
from fednested.deltas import expert_deltas_from_adapters, merge_expert_deltas
from fednested.evaluation import EvalConfig, evaluate_domains
from fednested.evaluation.forgetting import forgetting_report
from fednested.training import EdgeTrainConfig, train_adapters
from fednested.training.safeguards import estimate_fisher

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "forgetting.json"
SAFEGUARDS = ("none", "ewc", "distillation", "freezing", "combined")
TARGETS = {"forgetting_reduction_best": ">= 0.5", "new_domain_cost_best": "<= 0.10"}


@dataclass(frozen=True)
class ForgettingBenchSettings:
    """The world, the two scenarios and the safeguards' settings; defaults are what `make bench-forgetting` runs."""

    seeds: tuple[int, ...] = (0, 1, 2)
    # the world (bench/asynchronous.build_world reads these)
    corpus_seed: int = 0
    pretrain_records_per_domain: int = 48
    heldout_per_domain: int = 16
    tokenizer_vocab: int = 1024
    pretrain_steps: int = 30
    devices: int = 3
    device_records: int = 48
    seq_len: int = 128
    # local training, as bench/federated.py's
    rows_per_batch: int = 4
    learning_rate: float = 5e-3
    lora_rank: int = 8
    lora_alpha: float = 16
    # sequential scenario: the domains in the order they are learnt, and steps per stage
    sequence: tuple[str, ...] = ("medical", "legal", "code")
    stage_steps: int = 10
    # federated scenario: one device per trained domain, the other domains held out (and protected)
    trained_domains: tuple[str, ...] = ("medical", "legal", "code")
    rounds: int = 3
    local_steps: int = 5
    # the parent version's Fisher: records per protected domain (never training or held-out records) and tokens
    fisher_records_per_domain: int = 8
    fisher_max_tokens: int = 4096
    # the federation's public replay set: records of every domain, disjoint from everything else
    replay_records_per_domain: int = 4
    # the safeguards (chosen on seed 100 with --tune; docs/benchmarks/forgetting.md has the grid)
    ewc_lambda: float = 0.3
    distill_weight: float = 3.0
    distill_temperature: float = 2.0
    freeze_top_experts: int = 1
    combined_ewc_lambda: float = 0.1
    combined_replay_fraction: float = 0.2

    def __post_init__(self) -> None:
        if not self.seeds or self.rounds < 1 or not self.sequence or not self.trained_domains:
            raise ValueError("give seeds, at least one round, a sequence and trained domains")
        extra = self.fisher_records_per_domain + self.replay_records_per_domain
        if self.device_records + extra > self.pool_per_domain:
            raise ValueError(
                f"each domain's pool holds {self.pool_per_domain} records; {self.device_records + extra} needed"
            )

    @property
    def pool_per_domain(self) -> int:
        """Training records build_world leaves per domain after pre-training."""
        return -(-self.devices * self.device_records // 5) + self.device_records

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank


QUICK: dict[str, Any] = {"seeds": (0,), "rounds": 2, "stage_steps": 8, "sequence": ("medical", "legal")}


def safeguard_config(name: str, settings: ForgettingBenchSettings, frozen: Sequence[str]) -> SafeguardConfig:
    """The SafeguardConfig of one compared configuration; `frozen` are the experts the freezing rule picked."""
    if name == "none":
        return SafeguardConfig()
    if name == "ewc":
        return SafeguardConfig(ewc_lambda=settings.ewc_lambda)
    if name == "distillation":
        return SafeguardConfig(distill_weight=settings.distill_weight, distill_temperature=settings.distill_temperature)
    if name == "freezing":
        return SafeguardConfig(freeze_experts=tuple(frozen))
    if name == "combined":
        return SafeguardConfig(
            ewc_lambda=settings.combined_ewc_lambda,
            distill_weight=settings.distill_weight,
            distill_temperature=settings.distill_temperature,
            replay_fraction=settings.combined_replay_fraction,
        )
    raise ValueError(f"unknown safeguard configuration {name!r}; known: {', '.join(SAFEGUARDS)}")


def most_important_experts(fisher: Mapping[str, torch.Tensor], per_layer: int) -> list[str]:
    """The freezing rule: in each MoE layer, the `per_layer` experts with the largest Fisher mass on the protected
    domains, as freeze_experts entries "<layer>:<expert>"."""
    mass: dict[int, torch.Tensor] = {}
    for name, tensor in fisher.items():
        if ".mlp.experts." not in name:
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        per_expert = tensor.flatten(1).sum(dim=1)
        mass[layer] = mass[layer] + per_expert if layer in mass else per_expert
    return [
        f"{layer}:{expert}"
        for layer, totals in sorted(mass.items())
        for expert in sorted(torch.topk(totals, min(per_layer, totals.numel())).indices.tolist())
    ]


# --------------------------------------------------------------------------------------------------------------------
# data of one seed


@dataclass(frozen=True)
class SeedData:
    """Disjoint records per domain: training, the Fisher's protected records, and the public replay set."""

    train: dict[str, list[Record]]
    protected: dict[str, list[Record]]
    replay: list[Record]


def deal(world: World, settings: ForgettingBenchSettings, seed: int) -> SeedData:
    generator = torch.Generator().manual_seed(seed)
    train: dict[str, list[Record]] = {}
    protected: dict[str, list[Record]] = {}
    replay: list[Record] = []
    for name, pool in sorted(world.device_pool.items()):
        order = [pool[index] for index in torch.randperm(len(pool), generator=generator).tolist()]
        train[name] = order[: settings.device_records]
        rest = order[settings.device_records :]
        protected[name] = rest[: settings.fisher_records_per_domain]
        replay.extend(rest[settings.fisher_records_per_domain :][: settings.replay_records_per_domain])
    return SeedData(train=train, protected=protected, replay=replay)


def heldout_losses(model: nn.Module, world: World) -> dict[str, float]:
    results = evaluate_domains(model, world.tokenizer, world.heldout, EvalConfig(seq_len=512, rows_per_batch=8))
    return {name: result.loss for name, result in results.items()}


# --------------------------------------------------------------------------------------------------------------------
# one local run with safeguards


@dataclass
class LocalRun:
    adapters: dict[str, torch.Tensor]
    routed: dict[str, int]
    ewc_penalty: float | None
    distill_loss: float | None


def train_with_safeguards(
    server: nn.Module,
    world: World,
    records: Sequence[Record],
    settings: ForgettingBenchSettings,
    safeguards: SafeguardConfig,
    *,
    steps: int,
    seed: int,
    fisher: Mapping[str, torch.Tensor] | None,
    replay: Sequence[Record],
) -> LocalRun:
    """Fresh expert adapters on a copy of `server`, trained with `train_adapters` and the safeguards."""
    model = attach_expert_adapters(
        copy.deepcopy(server),
        ExpertLoraConfig(rank=settings.lora_rank, alpha=settings.lora_alpha, init_seed=seed),
    )
    config = EdgeTrainConfig(
        seq_len=settings.seq_len,
        rows_per_batch=settings.rows_per_batch,
        learning_rate=settings.learning_rate,
        max_steps=steps,
        seed=seed,
        precision="fp32",
        num_threads=1,
        safeguards=safeguards,
    )
    tokenizer = world.tokenizer
    pad_id = tokenizer.pad_token_id if isinstance(tokenizer.pad_token_id, int) else tokenizer.eos_token_id
    with count_routed_tokens(model, pad_id=pad_id if isinstance(pad_id, int) else None) as routed:
        metrics = train_adapters(model, tokenizer, records, config, fisher=fisher, replay=replay)
    return LocalRun(adapter_state_dict(model), dict(routed), metrics.ewc_penalty, metrics.distill_loss)


def parent_fisher(
    model: nn.Module, world: World, data: SeedData, protected: Sequence[str], settings: ForgettingBenchSettings
) -> dict[str, torch.Tensor]:
    """The Fisher the server estimates for a version on its protected domains (what fisher.safetensors ships)."""
    return estimate_fisher(
        model,
        world.tokenizer,
        {name: data.protected[name] for name in protected},
        max_tokens=settings.fisher_max_tokens,
        seq_len=settings.seq_len,
    )


def _needs_fisher(name: str) -> bool:
    return name in {"ewc", "freezing", "combined"}


# --------------------------------------------------------------------------------------------------------------------
# the two scenarios


@dataclass
class ScenarioRun:
    """One configuration on one seed: each version's losses, the final report's figures, the new-domain loss."""

    safeguard: str
    seed: int
    losses: dict[str, dict[str, float]] = field(default_factory=dict)
    average_forgetting: float = 0.0
    backward_transfer: float = 0.0
    new_domain_loss: float = 0.0
    ewc_penalty: list[float] = field(default_factory=list)
    distill_loss: list[float] = field(default_factory=list)
    frozen: list[list[str]] = field(default_factory=list)
    wall_seconds: float = 0.0

    def finish(self, versions: Sequence[str]) -> None:
        report = forgetting_report(versions, self.losses, parent=versions[-2], champions=list(versions[:-1]))
        self.average_forgetting = report.average_forgetting or 0.0
        self.backward_transfer = report.backward_transfer or 0.0

    def note(self, run: LocalRun) -> None:
        if run.ewc_penalty is not None:
            self.ewc_penalty.append(run.ewc_penalty)
        if run.distill_loss is not None:
            self.distill_loss.append(run.distill_loss)


def _merge(server: nn.Module, adapters: Mapping[str, torch.Tensor], settings: ForgettingBenchSettings) -> None:
    lora = ExpertLoraConfig(rank=settings.lora_rank, alpha=settings.lora_alpha)
    merge_expert_deltas(server, expert_deltas_from_adapters(adapters, lora, server), eta=1.0)


def run_sequential(
    world: World, data: SeedData, settings: ForgettingBenchSettings, name: str, seed: int, base: dict[str, float]
) -> ScenarioRun:
    """The domains of `settings.sequence` learnt one per stage by one model; new-domain loss is the mean over stages
    of the stage's domain right after it."""
    started = time.perf_counter()
    run = ScenarioRun(safeguard=name, seed=seed, losses={"base": base})
    model = copy.deepcopy(world.base)
    versions = ["base"]
    new_losses = []
    for stage, domain in enumerate(settings.sequence):
        protected = [other for other in sorted(world.heldout) if other != domain]
        fisher = parent_fisher(model, world, data, protected, settings) if _needs_fisher(name) else None
        frozen = most_important_experts(fisher, settings.freeze_top_experts) if fisher is not None else []
        if name == "freezing":
            run.frozen.append(frozen)
        local = train_with_safeguards(
            model,
            world,
            data.train[domain],
            settings,
            safeguard_config(name, settings, frozen),
            steps=settings.stage_steps,
            seed=seed * 1_000_003 + stage,
            fisher=fisher,
            replay=data.replay,
        )
        run.note(local)
        _merge(model, local.adapters, settings)
        version = f"stage-{stage + 1}-{domain}"
        versions.append(version)
        run.losses[version] = heldout_losses(model, world)
        new_losses.append(run.losses[version][domain])
    run.finish(versions)
    run.new_domain_loss = statistics.fmean(new_losses)
    run.wall_seconds = time.perf_counter() - started
    return run


def run_federated(
    world: World, data: SeedData, settings: ForgettingBenchSettings, name: str, seed: int, base: dict[str, float]
) -> ScenarioRun:
    """Synchronous rounds of one single-domain device per trained domain; updates weighted by routed tokens and
    combined per expert, as the aggregation worker does; new-domain loss is the trained domains' mean at the end."""
    started = time.perf_counter()
    run = ScenarioRun(safeguard=name, seed=seed, losses={"base": base})
    server = copy.deepcopy(world.base)
    protected = [other for other in sorted(world.heldout) if other not in settings.trained_domains]
    config = AggregationConfig()
    versions = ["base"]
    for round_index in range(settings.rounds):
        fisher = parent_fisher(server, world, data, protected, settings) if _needs_fisher(name) else None
        frozen = most_important_experts(fisher, settings.freeze_top_experts) if fisher is not None else []
        if name == "freezing":
            run.frozen.append(frozen)
        sources: list[AdapterFactors] = []
        facts: list[UpdateFacts[str]] = []
        for index, domain in enumerate(settings.trained_domains):
            local = train_with_safeguards(
                server,
                world,
                data.train[domain],
                settings,
                safeguard_config(name, settings, frozen),
                steps=settings.local_steps,
                seed=seed * 1_000_003 + round_index * 101 + index,
                fisher=fisher,
                replay=data.replay,
            )
            run.note(local)
            update_id = f"r{round_index}-{domain}"
            source = AdapterFactors(update_id, local.adapters, settings.lora_scale)
            sources.append(source)
            facts.append(
                UpdateFacts(
                    update_id=update_id,
                    experts=frozenset(expert_of_delta(key) for key in source.delta_keys()),
                    staleness=0,
                    examples=len(data.train[domain]),
                    routed_tokens=local.routed,
                )
            )
        weights = bounded_expert_weights(facts, config.weighting).weights
        deltas: dict[str, torch.Tensor] = {}
        aggregate_factored(sources, weights, config, deltas.__setitem__)
        merge_expert_deltas(server, deltas, eta=config.server_learning_rate)
        version = f"round-{round_index + 1}"
        versions.append(version)
        run.losses[version] = heldout_losses(server, world)
    run.finish(versions)
    run.new_domain_loss = statistics.fmean(run.losses[versions[-1]][domain] for domain in settings.trained_domains)
    run.wall_seconds = time.perf_counter() - started
    return run


SCENARIOS = {"sequential": run_sequential, "federated": run_federated}


# --------------------------------------------------------------------------------------------------------------------
# the report


def summarise(runs: Mapping[str, Sequence[ScenarioRun]]) -> dict[str, Any]:
    """Per configuration: mean and spread over seeds of average forgetting, BWT and new-domain loss, each against
    no safeguard; the best safeguard is the one with the lowest mean average forgetting among those whose new-domain
    cost is at most 0.10 (any safeguard if none is)."""
    none = runs["none"]
    forgetting_none = statistics.fmean(run.average_forgetting for run in none)
    new_none = statistics.fmean(run.new_domain_loss for run in none)
    table: dict[str, Any] = {}
    for name, seeded in runs.items():
        forgetting = statistics.fmean(run.average_forgetting for run in seeded)
        new = statistics.fmean(run.new_domain_loss for run in seeded)
        table[name] = {
            "average_forgetting": spread([run.average_forgetting for run in seeded]),
            "backward_transfer": spread([run.backward_transfer for run in seeded]),
            "new_domain_loss": spread([run.new_domain_loss for run in seeded]),
            "forgetting_reduction": 1 - forgetting / forgetting_none if forgetting_none > 0 else None,
            "new_domain_cost": (new - new_none) / new_none,
            "wall_seconds": sum(run.wall_seconds for run in seeded),
            "runs": [asdict(run) for run in seeded],
        }
    candidates = [name for name in table if name != "none"]
    affordable = [name for name in candidates if table[name]["new_domain_cost"] <= 0.10] or candidates
    best = min(affordable, key=lambda name: table[name]["average_forgetting"]["mean"])
    return {
        "best_safeguard": best,
        "forgetting_reduction_best": table[best]["forgetting_reduction"],
        "new_domain_cost_best": table[best]["new_domain_cost"],
        "targets_met": {
            "forgetting_reduction_best": (table[best]["forgetting_reduction"] or 0.0) >= 0.5,
            "new_domain_cost_best": table[best]["new_domain_cost"] <= 0.10,
        },
        "safeguards": table,
    }


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_benchmark(settings: ForgettingBenchSettings, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    torch.set_num_threads(1)
    machine = machine_info(torch.get_num_threads())
    world = build_world(settings)
    base = heldout_losses(world.base, world)
    scenarios: dict[str, Any] = {}
    for scenario, runner in SCENARIOS.items():
        runs: dict[str, list[ScenarioRun]] = {name: [] for name in SAFEGUARDS}
        for seed in settings.seeds:
            data = deal(world, settings, seed)
            for name in SAFEGUARDS:
                run = runner(world, data, settings, name, seed, base)
                runs[name].append(run)
                _progress(
                    f"{scenario} seed {seed} {name}: forgetting {run.average_forgetting:.4f} "
                    f"bwt {run.backward_transfer:.4f} new {run.new_domain_loss:.4f} ({run.wall_seconds:.0f}s)"
                )
        scenarios[scenario] = summarise(runs)
    report: dict[str, Any] = {
        "schema": 1,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "settings": asdict(settings),
        "base_loss": base,
        "targets": TARGETS,
        **{
            f"{scenario}_{key}": scenarios[scenario][key]
            for scenario in scenarios
            for key in ("forgetting_reduction_best", "new_domain_cost_best", "best_safeguard")
        },
        "scenarios": scenarios,
    }
    return write_report(report, out, started=started)


def tune(settings: ForgettingBenchSettings, seed: int, only: str | None = None) -> None:
    """Print the grid the defaults were chosen from (one seed not among the reported ones)."""
    world = build_world(settings)
    base = heldout_losses(world.base, world)
    data = deal(world, settings, seed)
    grid: list[tuple[str, ForgettingBenchSettings]] = [("none", settings)]
    grid += [("ewc", replace(settings, ewc_lambda=value)) for value in (0.1, 0.3, 1.0, 3.0)]
    grid += [("distillation", replace(settings, distill_weight=value)) for value in (0.3, 1.0, 3.0)]
    grid += [("freezing", replace(settings, freeze_top_experts=value)) for value in (1, 2)]
    grid += [("combined", replace(settings, combined_ewc_lambda=value)) for value in (0.1, 0.3)]
    for scenario, runner in SCENARIOS.items():
        if only is not None and scenario != only:
            continue
        for name, point in grid:
            run = runner(world, data, point, name, seed, base)
            chosen = {
                "ewc": point.ewc_lambda,
                "distillation": point.distill_weight,
                "freezing": point.freeze_top_experts,
                "combined": point.combined_ewc_lambda,
            }
            _progress(
                f"tune {scenario} {name} {chosen.get(name, '')}: forgetting {run.average_forgetting:.4f} "
                f"new {run.new_domain_loss:.4f} ({run.wall_seconds:.0f}s)"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one seed, 2 stages, 2 rounds")
    parser.add_argument("--tune", type=int, default=None, metavar="SEED", help="print the tuning grid on SEED instead")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default=None, help="with --tune: only this scenario")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
    if args.seeds is not None:
        overrides["seeds"] = tuple(int(seed) for seed in args.seeds.split(",") if seed.strip())
    settings = ForgettingBenchSettings(**overrides)
    if args.tune is not None:
        tune(settings, args.tune, args.scenario)
        return 0
    report = run_benchmark(settings, args.out)
    keys = [key for key in report if key.startswith(("sequential_", "federated_"))]
    print(json.dumps({key: report[key] for key in keys} | {"wall_seconds": report["wall_seconds"]}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
