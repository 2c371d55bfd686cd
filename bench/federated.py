"""Federated edge LoRA against centralised LoRA on the same tokens; server optimisers, robust rules under poisoning,
and differential privacy, all compared in one run.

`make bench-federated` writes bench/results/federated.json. The world is bench/asynchronous.py's (generated corpus,
BPE, `tiny` base pre-trained briefly); five single-domain devices hold records of three of the five domains, and the
other two domains are never trained. Every window is combined by `RoundAggregationSettings.from_mapping(config)` and
`combine_window`, the code the aggregation worker runs, with the weights built as the worker builds them (claimed
tokens bounded by the device's history, then `UpdateFacts`). Docs: docs/benchmarks/federated.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from bench.asynchronous import Device, World, build_world, train_local
from bench.report import machine as machine_info
from bench.report import write_report
from fednested.adapters import ExpertLoraConfig
from fednested.adapters.lora import parse_adapter_key
from fednested.aggregation import UpdateFacts, UpdateRejected, expert_of_delta
from fednested.aggregation.factors import AdapterFactors
from fednested.aggregation.privacy import epsilon_for, noise_multiplier_for
from fednested.aggregation.server_optimizers import resume_server_optimizer
from fednested.aggregation.settings import RoundAggregationSettings
from fednested.aggregation.validation import check_delta_norms
from fednested.aggregation.weights import bound_claimed_tokens, reliability_from_history
from fednested.aggregation.window import combine_window
from fednested.deltas import expert_deltas_from_adapters, merge_expert_deltas
from fednested.evaluation import EvalConfig, evaluate_domains

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "federated.json"
Attack = Literal["none", "scaled", "sign_flip", "inflated_claims"]
ATTACKS: tuple[Attack, ...] = get_args(Attack)
# The aggregation worker reads this many of a device's latest decided updates (workers/aggregation.HISTORY_LENGTH).
CLAIM_HISTORY_LENGTH = 20

# The robust configurations compared, declared before any run: round-config keys exactly as a federation sets them.
# Every key that changes the rule is spelled out, so a change of the library's defaults cannot change what is measured.
RULES: dict[str, dict[str, Any]] = {
    # FedAvg's weighted mean with no defence at all (no share cap, no clip, no norm bound).
    "weighted_mean": {
        "aggregation_method": "weighted_mean",
        "max_update_share": None,
        "clip_norm": None,
        "norm_bound_multiplier": None,
        "min_cosine": None,
    },
    # The mean, with each update scaled down to 2x the median norm of the window and no device over 40 % of an
    # expert's weight (below one half, so no single update holds the weighted median).
    "weighted_mean_bounded": {
        "aggregation_method": "weighted_mean",
        "max_update_share": 0.4,
        "clip_norm": None,
        "norm_bound_multiplier": 2.0,
        "min_cosine": None,
    },
    # The bounded mean plus the direction screen on whole updates: an update whose cosine with the weighted mean of the
    # other four is below -0.02 is dropped. Chosen on the tuning seed: honest updates' whole-update cosines stayed
    # >= -0.005 in every round of a clean run and the flipped pair's <= -0.035; -0.01..-0.03 gave the same runs there.
    # LoRA deltas of different devices are nearly orthogonal (each trains its own random A), so cosines are small.
    "weighted_mean_bounded_direction": {
        "aggregation_method": "weighted_mean",
        "max_update_share": 0.4,
        "clip_norm": None,
        "norm_bound_multiplier": 2.0,
        "min_cosine": -0.02,
        "direction_scope": "update",
    },
    # floor(0.2 * 5) = 1 update trimmed from each end of every coordinate at K = 5.
    "trimmed_mean": {
        "aggregation_method": "trimmed_mean",
        "trim_fraction": 0.2,
        "max_update_share": 0.4,
        "clip_norm": None,
        "norm_bound_multiplier": None,
        "min_cosine": None,
    },
    "coordinate_median": {
        "aggregation_method": "coordinate_median",
        "max_update_share": 0.4,
        "clip_norm": None,
        "norm_bound_multiplier": None,
        "min_cosine": None,
    },
}

# Each optimiser's tuning grid (round-config keys; server_learning_rate is η), centred on what a first look at the
# tuning seed showed: fedavg improves up to η = 2 and diverges beyond 3; momentum β = 0.9 warms up too slowly for 10
# rounds (Reddi et al.'s moments have no bias correction), so β = 0.5 is tried too.
OPTIMIZER_GRIDS: dict[str, list[dict[str, Any]]] = {
    "fedavg": [{"server_learning_rate": eta} for eta in (1.0, 1.5, 2.0, 3.0)],
    "fedavgm": [
        {"server_learning_rate": eta, "server_momentum": beta}
        for beta, etas in ((0.5, (0.5, 1.0, 1.5)), (0.9, (0.2,)))
        for eta in etas
    ],
    "fedadam": [
        {"server_learning_rate": eta, "server_momentum": beta, "server_tau": 1e-3}
        for beta in (0.9, 0.5)
        for eta in (3e-3, 1e-2)
    ],
    "fedyogi": [
        {"server_learning_rate": eta, "server_momentum": beta, "server_tau": 1e-3}
        for beta in (0.9, 0.5)
        for eta in (3e-3, 1e-2)
    ],
}

SELECTION_RULES = {
    "local_learning_rate": "federated: the lr of the grid with the lowest trained-domain loss of fedavg (eta = 1, "
    "plain weighted mean) on the tuning seed; centralised: the lr with its own lowest trained-domain loss on the "
    "tuning seed. Each side gets its best lr.",
    "server_optimizer_config": "per optimiser, the grid point with the lowest trained-domain loss after all rounds on "
    "the tuning seed (plain weighted mean, the federated local lr).",
    "best_optimizer": "the optimiser whose tuned config has the lowest trained-domain loss on the tuning seed; the "
    "rules and DP runs use it, and federated_gap is its gap.",
    "default_rule": "among the rules whose clean trained-domain loss (mean over the reported seeds) is within "
    "clean_tolerance of the best clean rule's, the one with the lowest worst-attack poisoned_gap (the largest over the "
    "three attacks of the mean over seeds); recommended_default = the best optimiser's keys + that rule's keys.",
    "dp_clip": "clip_norm C = the median whole-update norm ||dW|| of the honest updates of the best optimiser's clean "
    "run on the tuning seed; z = noise_multiplier_for(epsilon, delta, rounds).",
}


@dataclass(frozen=True)
class FederatedBenchSettings:
    """The federation, local training, tuning grids and comparisons; defaults are what `make bench-federated` runs."""

    seeds: tuple[int, ...] = (0, 1, 2)
    # Hyperparameters are tuned on this seed only; it is not one of the reported seeds.
    tuning_seed: int = 100
    rounds: int = 10
    # Synchronous rounds: every device trains every round, K = number of devices.
    trained_domains: tuple[str, ...] = ("code", "legal", "medical")
    # Device i holds records of trained_domains[device_domains[i]] only: 2 + 2 + 1 devices, so weighting matters.
    device_domains: tuple[int, ...] = (0, 1, 2, 0, 1)
    # The 20 % attacker (one of five): a second "legal" device, so its domain still has an honest device.
    attacker: int = 4
    attack_scale: float = 100.0
    claim_inflation: float = 100.0
    # the world, as bench/asynchronous.py builds it
    corpus_seed: int = 0
    pretrain_records_per_domain: int = 48
    # Enough that 5 local steps of 4 rows x 128 tokens never reach the end of a device's data: every step is full,
    # so federated and centralised train on exactly the same number of real tokens.
    device_records: int = 48
    heldout_per_domain: int = 32
    tokenizer_vocab: int = 1024
    pretrain_steps: int = 30
    # local training (centralised uses the same rows, seq_len, rank and alpha, and rounds x devices x local_steps)
    local_steps: int = 5
    seq_len: int = 128
    rows_per_batch: int = 4
    # Overwritten by the tuned lr in every run; this value is only the default a caller's settings carry.
    learning_rate: float = 5e-3
    lora_rank: int = 8
    lora_alpha: float = 16
    learning_rate_grid: tuple[float, ...] = (5e-3, 1e-2, 2e-2)
    optimizer_grids: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: copy.deepcopy(OPTIMIZER_GRIDS))
    rules: dict[str, dict[str, Any]] = field(default_factory=lambda: copy.deepcopy(RULES))
    dp_epsilons: tuple[float, ...] = (1.0, 4.0, 8.0)
    dp_delta: float = 1e-5
    # A rule qualifies as default when its clean trained-domain loss is within this fraction of the best clean rule's.
    clean_tolerance: float = 0.01
    # The sign-flip runs are evaluated every round: the first round whose attacked-domain loss is this fraction above
    # the round before (a promotion gate's max_increase_fraction against the parent) is reported.
    gate_fraction: float = 0.02

    def __post_init__(self) -> None:
        if not self.seeds or self.tuning_seed in self.seeds:
            raise ValueError(f"give reported seeds, and a tuning seed not among them: {self.seeds}, {self.tuning_seed}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if not all(0 <= index < len(self.trained_domains) for index in self.device_domains):
            raise ValueError(f"device_domains {self.device_domains} index outside trained_domains")
        if not 0 <= self.attacker < len(self.device_domains):
            raise ValueError(f"attacker {self.attacker} is not one of the {len(self.device_domains)} devices")
        unknown = set(self.optimizer_grids) - {"fedavg", "fedavgm", "fedadam", "fedyogi"}
        if unknown or not all(self.optimizer_grids.values()) or not self.learning_rate_grid:
            raise ValueError(f"every optimiser grid needs a point, and no unknown optimisers ({sorted(unknown)})")

    @property
    def devices(self) -> int:
        """How many devices (build_world sizes the record pool from it)."""
        return len(self.device_domains)

    @property
    def attacked_domain(self) -> str:
        """The domain of the attacker's data."""
        return self.trained_domains[self.device_domains[self.attacker]]

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    @property
    def token_budget(self) -> int:
        """Token positions both sides train on: rounds x devices x local steps x rows x seq_len."""
        return self.rounds * self.devices * self.local_steps * self.rows_per_batch * self.seq_len


QUICK = {
    "seeds": (0,),
    "rounds": 3,
    "learning_rate_grid": (1e-2,),
    "optimizer_grids": {name: grid[:1] for name, grid in OPTIMIZER_GRIDS.items()},
    "dp_epsilons": (8.0,),
}


# --------------------------------------------------------------------------------------------------------------------
# devices, evaluation


def deal_devices(world: World, settings: FederatedBenchSettings, seed: int) -> list[Device]:
    """Device i gets `device_records` records of its one domain, drawn by the seed without replacement."""
    pools: dict[str, list[Any]] = {}
    generator = torch.Generator().manual_seed(seed)
    for name in settings.trained_domains:
        records = world.device_pool[name]
        order = torch.randperm(len(records), generator=generator).tolist()
        pools[name] = [records[index] for index in order]
    devices = []
    for index, domain_index in enumerate(settings.device_domains):
        name = settings.trained_domains[domain_index]
        if len(pools[name]) < settings.device_records:
            raise ValueError(f"domain {name!r} ran out of training records for device {index}; raise device_records")
        records, pools[name] = pools[name][: settings.device_records], pools[name][settings.device_records :]
        devices.append(Device(f"device-{index:02d}", (name,), tuple(records)))
    return devices


@dataclass(frozen=True)
class HeldOut:
    """Held-out loss, token-weighted over the trained and over the untrained domains, and per domain."""

    trained: float
    untrained: float
    domains: dict[str, float]


def evaluate(model: nn.Module, world: World, settings: FederatedBenchSettings) -> HeldOut:
    """Mean next-token loss over every held-out target token of the trained (resp. untrained) domains."""
    results = evaluate_domains(model, world.tokenizer, world.heldout, EvalConfig(seq_len=512, rows_per_batch=8))

    def pooled(names: Sequence[str]) -> float:
        tokens = sum(results[name].tokens for name in names)
        return sum(results[name].loss * results[name].tokens for name in names) / tokens if tokens else math.nan

    untrained = [name for name in results if name not in settings.trained_domains]
    return HeldOut(
        trained=pooled(settings.trained_domains),
        untrained=pooled(untrained),
        domains={name: result.loss for name, result in results.items()},
    )


def experts_per_token(model: nn.Module) -> int:
    """The router's top-k, from the model's config (what the control plane checks routed-token claims against)."""
    top_k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"{type(model).__name__} has no usable config.num_experts_per_tok ({top_k!r})")
    return top_k


def trained_tokens(routed: Mapping[str, int], top_k: int) -> int:
    """Real tokens a run trained on, from its routed-token counts: each layer routes every real token to top-k
    experts (edge_client.local_training.count_routed_tokens), so any layer's total / top-k is the count."""
    first = min(int(key.split(".")[0]) for key in routed)
    return sum(tokens for key, tokens in routed.items() if int(key.split(".")[0]) == first) // top_k


# --------------------------------------------------------------------------------------------------------------------
# the attacker


def poison(adapters: Mapping[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """The update with every lora_B multiplied by `factor`, so each dense delta scale·B·A is multiplied by it
    (x100: the scaled attack; -1: the sign flip)."""
    return {
        name: tensor * factor if parse_adapter_key(name)[2] == "lora_B" else tensor for name, tensor in adapters.items()
    }


# --------------------------------------------------------------------------------------------------------------------
# one federation and the centralised reference


@dataclass
class FederationRun:
    """One federation for one seed: the held-out loss after every round (round 0 is the base) or only at the end,
    what the rule did to the attacker's updates, the honest updates' norms and, with DP, the noise drawn."""

    label: str
    seed: int
    attack: Attack
    config: dict[str, Any]
    curve: list[HeldOut] = field(default_factory=list)
    honest_norms: list[float] = field(default_factory=list)
    attacker_weight: list[float] = field(default_factory=list)
    attacker_scaled: list[float] = field(default_factory=list)
    attacker_claim_bounded: int = 0
    rejected: list[str] = field(default_factory=list)
    noise_std: list[float] = field(default_factory=list)
    tokens: int = 0
    wall_seconds: float = 0.0

    @property
    def final(self) -> HeldOut:
        return self.curve[-1]


def local_seed(seed: int, round_index: int, device_index: int) -> int:
    """The seed of one local run: the same in every federation of a seed, so runs differ only by the server side."""
    return seed * 1_000_003 + round_index * 101 + device_index


def run_federation(
    world: World,
    devices: Sequence[Device],
    settings: FederatedBenchSettings,
    config: Mapping[str, Any],
    *,
    seed: int,
    learning_rate: float,
    label: str,
    attack: Attack = "none",
    every_round: bool = False,
) -> FederationRun:
    """`settings.rounds` synchronous rounds: every device trains fresh adapters on the current server model, the
    window is combined with `combine_window` under `config` (round-config keys) and merged into the server model."""
    started = time.perf_counter()
    round_settings = RoundAggregationSettings.from_mapping(config, where=f"bench config {label!r}")
    # A new federation: no saved optimiser state, as the worker's first window onto a base version.
    optimizer, _ = resume_server_optimizer(round_settings.server_optimizer, None)
    # Seeded, so the bench is reproducible; the worker draws its DP noise from os.urandom (secure_generator).
    noise = torch.Generator().manual_seed(seed * 7919 + 17)
    local = replace(settings, learning_rate=learning_rate)
    server = copy.deepcopy(world.base)
    top_k = experts_per_token(world.base)
    history: dict[str, list[float]] = {device.device_id: [] for device in devices}
    accepted: dict[str, int] = dict.fromkeys(history, 0)
    run = FederationRun(label=label, seed=seed, attack=attack, config=dict(config))
    if every_round:
        run.curve.append(evaluate(server, world, settings))

    def merge(key: str, step: torch.Tensor) -> None:
        # The optimiser's step already carries η.
        merge_expert_deltas(server, {key: step}, eta=1.0)

    for round_index in range(settings.rounds):
        sources: list[AdapterFactors] = []
        facts: list[UpdateFacts[str]] = []
        norms: dict[str, float] = {}
        claims: dict[str, float] = {}
        attacker_id = ""
        for index, device in enumerate(devices):
            adapters, routed, _ = train_local(server, device, world, local, seed=local_seed(seed, round_index, index))
            claimed = float(trained_tokens(routed, top_k))
            run.tokens += int(claimed)
            update_id = f"r{round_index:02d}-{device.device_id}"
            if index == settings.attacker and attack != "none":
                attacker_id = update_id
                if attack == "scaled":
                    adapters = poison(adapters, settings.attack_scale)
                elif attack == "sign_flip":
                    adapters = poison(adapters, -1.0)
                else:
                    claimed *= settings.claim_inflation
                    routed = {expert: int(tokens * settings.claim_inflation) for expert, tokens in routed.items()}
            source = AdapterFactors(update_id, adapters, settings.lora_scale)
            delta_norms = {key: source.read(key).norm() for key in sorted(source.delta_keys())}
            try:
                check_delta_norms(delta_norms, round_settings.limits, client_id=device.device_id)
            except UpdateRejected as rejection:
                run.rejected.append(f"{update_id}: {rejection.message}")
                continue
            # contribution_of in workers/aggregation.py: the claim bounded by the device's accepted history.
            bounded, note = bound_claimed_tokens(
                routed,
                claimed_tokens=claimed,
                history=history[device.device_id][-CLAIM_HISTORY_LENGTH:],
                factor=round_settings.claim_history_factor,
            )
            if note is not None and update_id == attacker_id:
                run.attacker_claim_bounded += 1
            sources.append(source)
            facts.append(
                UpdateFacts(
                    update_id=update_id,
                    experts=frozenset(expert_of_delta(key) for key in source.delta_keys()),
                    staleness=0,
                    examples=len(device.records),
                    routed_tokens=bounded,
                    reliability=reliability_from_history(accepted[device.device_id], 0),
                    sender=device.device_id,
                )
            )
            norms[update_id] = math.sqrt(sum(value * value for value in delta_norms.values()))
            claims[device.device_id] = claimed
            if update_id != attacker_id:
                run.honest_norms.append(norms[update_id])
        result = combine_window(sources, facts, round_settings, optimizer, merge, update_norms=norms, generator=noise)
        for device_id, claimed in claims.items():
            history[device_id].append(claimed)
            accepted[device_id] += 1
        if attacker_id:
            _record_attacker(run, result.report.experts.values(), result.record, attacker_id)
        privacy = result.record.get("privacy")
        if isinstance(privacy, dict):
            run.noise_std.append(float(privacy["noise_std"]))
        if every_round:
            run.curve.append(evaluate(server, world, settings))
    if not every_round:
        run.curve.append(evaluate(server, world, settings))
    run.wall_seconds = time.perf_counter() - started
    return run


def _record_attacker(run: FederationRun, experts: Any, record: Mapping[str, Any], attacker_id: str) -> None:
    """The attacker's mean normalised weight over the experts it reached, and the smallest factor its delta was
    scaled by (norm bound or clip; 1 when untouched)."""
    weights = [expert.weights.get(attacker_id, 0.0) / (sum(expert.weights.values()) or 1.0) for expert in experts]
    run.attacker_weight.append(statistics.fmean(weights) if weights else 0.0)
    scaled = record.get("rule", {}).get("scaled", {}).get(attacker_id)
    run.attacker_scaled.append(float(scaled["min_factor"]) if scaled else 1.0)


def train_centralised(
    world: World, devices: Sequence[Device], settings: FederatedBenchSettings, *, seed: int, learning_rate: float
) -> tuple[HeldOut, int]:
    """One fresh expert LoRA trained on the union of the devices' records for rounds x devices x local steps steps
    of the same rows and seq_len (the federation's token budget), merged into the base; its held-out loss and the
    real tokens it trained on."""
    union = Device(
        "centralised", settings.trained_domains, tuple(record for device in devices for record in device.records)
    )
    budget = replace(
        settings, local_steps=settings.rounds * len(devices) * settings.local_steps, learning_rate=learning_rate
    )
    adapters, routed, _ = train_local(world.base, union, world, budget, seed=seed)
    model = copy.deepcopy(world.base)
    lora = ExpertLoraConfig(rank=settings.lora_rank, alpha=settings.lora_alpha)
    merge_expert_deltas(model, expert_deltas_from_adapters(adapters, lora, world.base), eta=1.0)
    return evaluate(model, world, settings), trained_tokens(routed, experts_per_token(world.base))


# --------------------------------------------------------------------------------------------------------------------
# tuning, the reported seeds and the report


def optimizer_config(name: str, point: Mapping[str, Any]) -> dict[str, Any]:
    """Round-config keys of one optimiser grid point on the plain weighted mean."""
    return {"server_optimizer": name, **point, **RULES["weighted_mean"]}


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, min, max and (for 2+ values) stdev over seeds, with the values in seed order."""
    return {
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "per_seed": list(values),
    }


def relative(value: float, reference: float) -> float:
    return (value - reference) / reference


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tune(world: World, settings: FederatedBenchSettings) -> dict[str, Any]:
    """Every grid on the tuning seed (never a reported one); returns what was tried and what was chosen."""
    seed = settings.tuning_seed
    devices = deal_devices(world, settings, seed)
    fedavg_plain = optimizer_config("fedavg", {"server_learning_rate": 1.0})
    federated_lr: dict[str, float] = {}
    centralised_lr: dict[str, float] = {}
    # Runs by (config, lr): fedavg at eta = 1 is both a point of the lr grid and of fedavg's grid; it runs once.
    done: dict[str, FederationRun] = {}

    def federate(config: Mapping[str, Any], lr: float, label: str) -> FederationRun:
        key = json.dumps([config, lr], sort_keys=True)
        if key not in done:
            done[key] = run_federation(world, devices, settings, config, seed=seed, learning_rate=lr, label=label)
        return done[key]

    for lr in settings.learning_rate_grid:
        run = federate(fedavg_plain, lr, f"tune lr {lr}")
        federated_lr[repr(lr)] = run.final.trained
        central, _ = train_centralised(world, devices, settings, seed=seed, learning_rate=lr)
        centralised_lr[repr(lr)] = central.trained
        _progress(f"  tune lr {lr:g}: federated {run.final.trained:.4f}, centralised {central.trained:.4f}")
    fed_lr = float(min(federated_lr, key=federated_lr.__getitem__))
    central_lr = float(min(centralised_lr, key=centralised_lr.__getitem__))
    grids: dict[str, Any] = {}
    runs: dict[str, FederationRun] = {}
    for name, grid in settings.optimizer_grids.items():
        tried: list[dict[str, Any]] = []
        for point in grid:
            config = optimizer_config(name, point)
            run = federate(config, fed_lr, f"tune {name}")
            tried.append({"point": point, "trained_loss": run.final.trained, "untrained_loss": run.final.untrained})
            if name not in runs or run.final.trained < runs[name].final.trained:
                runs[name] = run
            _progress(f"  tune {name} {point}: {run.final.trained:.4f} ({run.wall_seconds:.0f} s)")
        chosen = min(tried, key=lambda entry: entry["trained_loss"])
        grids[name] = {"grid": tried, "chosen": chosen["point"], "trained_loss": chosen["trained_loss"]}
    best = min(grids, key=lambda name: grids[name]["trained_loss"])
    clip = statistics.median(runs[best].honest_norms)
    return {
        "seed": seed,
        "local_learning_rate": {
            "grid": list(settings.learning_rate_grid),
            "federated_fedavg_trained_loss": federated_lr,
            "centralised_trained_loss": centralised_lr,
            "federated": fed_lr,
            "centralised": central_lr,
        },
        "server_optimizers": grids,
        "best_optimizer": best,
        "dp_clip_norm": clip,
        "dp_clip_from": f"median of {len(runs[best].honest_norms)} whole-update norms of {best}'s tuning run",
    }


def _stats(runs: Sequence[FederationRun]) -> dict[str, Any]:
    return {
        "trained_loss": spread([run.final.trained for run in runs]),
        "untrained_loss": spread([run.final.untrained for run in runs]),
        "domain_loss_mean": {
            name: statistics.fmean(run.final.domains[name] for run in runs) for name in runs[0].final.domains
        },
    }


def gate_round(curve: Sequence[float], fraction: float) -> int | None:
    """The first round whose loss is more than `fraction` above the round before (what a promotion gate with that
    max_increase_fraction against the parent would refuse), or None."""
    return next(
        (index for index in range(1, len(curve)) if curve[index] > curve[index - 1] * (1 + fraction)),
        None,
    )


def _attacked_domain(runs: Sequence[FederationRun], settings: FederatedBenchSettings) -> dict[str, Any]:
    """The attacked domain's held-out loss after every round, and the round a per-domain gate would first refuse."""
    name = settings.attacked_domain
    curves = {str(run.seed): [round(point.domains[name], 5) for point in run.curve] for run in runs}
    return {
        "domain": name,
        "curves": curves,
        "gate_fraction": settings.gate_fraction,
        "first_round_over_gate": [gate_round(curve, settings.gate_fraction) for curve in curves.values()],
    }


def _attacker_summary(runs: Sequence[FederationRun]) -> dict[str, Any]:
    weights = [weight for run in runs for weight in run.attacker_weight]
    factors = [factor for run in runs for factor in run.attacker_scaled]
    return {
        "mean_weight_share": statistics.fmean(weights) if weights else None,
        "smallest_scale_factor": min(factors) if factors else None,
        "claims_bounded_by_history": sum(run.attacker_claim_bounded for run in runs),
    }


@dataclass
class SeedRuns:
    """Everything one reported seed ran: centralised, each optimiser, each rule under each attack, DP at each ε."""

    seed: int
    centralised: HeldOut
    centralised_tokens: int
    optimizers: dict[str, FederationRun] = field(default_factory=dict)
    rules: dict[str, dict[Attack, FederationRun]] = field(default_factory=dict)
    private: dict[float, FederationRun] = field(default_factory=dict)
    wall_seconds: float = 0.0


def optimizer_keys_of(tuning: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each optimiser's tuned round-config keys."""
    return {name: {"server_optimizer": name, **entry["chosen"]} for name, entry in tuning["server_optimizers"].items()}


def dp_keys(settings: FederatedBenchSettings, tuning: Mapping[str, Any], epsilon: float) -> dict[str, Any]:
    """The round config's `dp` object for a target ε over the federation's rounds."""
    return {
        "noise_multiplier": noise_multiplier_for(epsilon, settings.dp_delta, settings.rounds),
        "clip_norm": tuning["dp_clip_norm"],
        "delta": settings.dp_delta,
        "epsilon_budget": epsilon,
        "planned_aggregations": settings.rounds,
    }


def run_seed(world: World, settings: FederatedBenchSettings, tuning: Mapping[str, Any], seed: int) -> SeedRuns:
    """One reported seed with the tuned settings. The undefended weighted mean's clean run is the best optimiser's
    run (the same config), not a second one."""
    started = time.perf_counter()
    devices = deal_devices(world, settings, seed)
    fed_lr = tuning["local_learning_rate"]["federated"]
    held, tokens = train_centralised(
        world, devices, settings, seed=seed, learning_rate=tuning["local_learning_rate"]["centralised"]
    )
    _progress(f"seed {seed} centralised: trained {held.trained:.4f}, untrained {held.untrained:.4f}")
    result = SeedRuns(seed=seed, centralised=held, centralised_tokens=tokens)

    def federate(config: Mapping[str, Any], label: str, attack: Attack = "none", every: bool = False) -> FederationRun:
        run = run_federation(
            world,
            devices,
            settings,
            config,
            seed=seed,
            learning_rate=fed_lr,
            label=label,
            attack=attack,
            every_round=every,
        )
        _progress(
            f"seed {seed} {label} {attack}: trained {run.final.trained:.4f}, untrained {run.final.untrained:.4f} "
            f"({run.wall_seconds:.0f} s)"
        )
        return run

    keys = optimizer_keys_of(tuning)
    best = tuning["best_optimizer"]
    for name, optimizer in keys.items():
        result.optimizers[name] = federate({**optimizer, **RULES["weighted_mean"]}, name, every=True)
    for rule, rule_keys in settings.rules.items():
        result.rules[rule] = {}
        for attack in ATTACKS:
            config = {**keys[best], **rule_keys}
            if attack == "none" and config == {**keys[best], **RULES["weighted_mean"]}:
                result.rules[rule][attack] = result.optimizers[best]
            else:
                result.rules[rule][attack] = federate(config, rule, attack, every=attack == "sign_flip")
    for epsilon in settings.dp_epsilons:
        dp = dp_keys(settings, tuning, epsilon)
        result.private[epsilon] = federate({**keys[best], **RULES["weighted_mean"], "dp": dp}, f"dp eps={epsilon:g}")
    result.wall_seconds = time.perf_counter() - started
    return result


def run_benchmark(settings: FederatedBenchSettings, out: Path) -> dict[str, Any]:
    """Tuning, then every reported seed: centralised, each optimiser, each rule under each attack, DP at each ε."""
    started = time.perf_counter()
    torch.set_num_threads(1)
    machine = machine_info(torch.get_num_threads())
    world = build_world(settings)
    walls: dict[str, float] = {}
    clock = time.perf_counter()
    tuning = tune(world, settings)
    walls["tuning"] = time.perf_counter() - clock
    central_lr = tuning["local_learning_rate"]["centralised"]
    best = tuning["best_optimizer"]
    optimizer_keys = optimizer_keys_of(tuning)
    epsilons = {epsilon: dp_keys(settings, tuning, epsilon)["noise_multiplier"] for epsilon in settings.dp_epsilons}

    seeds = [run_seed(world, settings, tuning, seed) for seed in settings.seeds]
    for result in seeds:
        walls[f"seed {result.seed}"] = result.wall_seconds
    central = [result.centralised for result in seeds]
    central_tokens = [result.centralised_tokens for result in seeds]
    optimizers = {name: [result.optimizers[name] for result in seeds] for name in optimizer_keys}
    rules = {
        rule: {attack: [result.rules[rule][attack] for result in seeds] for attack in ATTACKS}
        for rule in settings.rules
    }
    private = {epsilon: [result.private[epsilon] for result in seeds] for epsilon in epsilons}

    central_trained = [held.trained for held in central]
    optimizer_report: dict[str, Any] = {}
    for name, runs in optimizers.items():
        gaps = [relative(run.final.trained, reference) for run, reference in zip(runs, central_trained, strict=True)]
        optimizer_report[name] = {
            "config": {**optimizer_keys[name], **RULES["weighted_mean"]},
            **_stats(runs),
            "federated_gap": spread(gaps),
            "share_of_centralised_improvement": spread(
                [
                    (run.curve[0].trained - run.final.trained) / (run.curve[0].trained - reference)
                    for run, reference in zip(runs, central_trained, strict=True)
                ]
            ),
            "curves": {
                str(run.seed): [[round(point.trained, 5), round(point.untrained, 5)] for point in run.curve]
                for run in runs
            },
            "real_tokens_per_seed": [run.tokens for run in runs],
        }
    rule_report: dict[str, Any] = {}
    for rule, by_attack in rules.items():
        clean = [run.final.trained for run in by_attack["none"]]
        undefended = (
            [run.final.trained for run in rules["weighted_mean"]["none"]] if "weighted_mean" in rules else clean
        )
        scenarios: dict[str, Any] = {}
        for attack, runs in by_attack.items():
            entry: dict[str, Any] = _stats(runs)
            if attack != "none":
                finals = [run.final.trained for run in runs]
                entry["poisoned_gap"] = spread([relative(value, ref) for value, ref in zip(finals, clean, strict=True)])
                entry["gap_vs_undefended_clean"] = spread(
                    [relative(value, ref) for value, ref in zip(finals, undefended, strict=True)]
                )
                entry["attacker"] = _attacker_summary(runs)
                if len(runs[0].curve) > 1:
                    entry["attacked_domain"] = _attacked_domain(runs, settings)
            scenarios[attack] = entry
        worst = max(
            (attack for attack in ATTACKS if attack != "none"), key=lambda a: scenarios[a]["poisoned_gap"]["mean"]
        )
        rule_report[rule] = {
            "config": {**optimizer_keys[best], **settings.rules[rule]},
            "scenarios": scenarios,
            "clean_trained_loss": statistics.fmean(clean),
            "clean_gap_vs_centralised": spread(
                [relative(value, ref) for value, ref in zip(clean, central_trained, strict=True)]
            ),
            "worst_attack": worst,
            "worst_attack_poisoned_gap": scenarios[worst]["poisoned_gap"]["mean"],
        }
    best_clean = min(entry["clean_trained_loss"] for entry in rule_report.values())
    eligible = [
        rule
        for rule, entry in rule_report.items()
        if entry["clean_trained_loss"] <= best_clean * (1 + settings.clean_tolerance)
    ]
    default_rule = min(eligible, key=lambda rule: rule_report[rule]["worst_attack_poisoned_gap"])
    dp_report: dict[str, Any] = {}
    for epsilon, runs in private.items():
        z = epsilons[epsilon]
        dp_report[repr(epsilon)] = {
            "epsilon_target": epsilon,
            "delta": settings.dp_delta,
            "noise_multiplier": z,
            "clip_norm": tuning["dp_clip_norm"],
            "epsilon_accounted": epsilon_for([z] * settings.rounds, settings.dp_delta),
            "noise_std_per_coordinate": runs[0].noise_std[0] if runs[0].noise_std else None,
            **_stats(runs),
            "gap_vs_centralised": spread(
                [relative(run.final.trained, ref) for run, ref in zip(runs, central_trained, strict=True)]
            ),
        }
    best_gaps = optimizer_report[best]["federated_gap"]
    default_config = rule_report[default_rule]["config"]
    report: dict[str, Any] = {
        "schema": "fednested.bench.federated/1",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "settings": asdict(settings) | {"token_budget": settings.token_budget, "devices": settings.devices},
        "model": {"preset": "tiny", "family": "mixtral", "tokenizer_vocab": len(world.tokenizer)},
        "pretraining_loss": {"first": world.pretraining_loss[:1], "last": world.pretraining_loss[-1:]},
        "selection_rules": SELECTION_RULES,
        "federated_gap": best_gaps["mean"],
        "federated_gap_optimizer": best,
        "federated_gap_per_seed": best_gaps["per_seed"],
        "federated_gap_recommended_default": rule_report[default_rule]["clean_gap_vs_centralised"]["mean"],
        "poisoned_gap": rule_report[default_rule]["worst_attack_poisoned_gap"],
        "poisoned_gap_rule": default_rule,
        "poisoned_gap_attack": rule_report[default_rule]["worst_attack"],
        "recommended_default": default_config,
        "rules_eligible_for_default": eligible,
        "tuning": tuning,
        "centralised": {
            "learning_rate": central_lr,
            "trained_loss": spread(central_trained),
            "untrained_loss": spread([held.untrained for held in central]),
            "real_tokens_per_seed": central_tokens,
        },
        "base_loss": {
            "trained": optimizers[best][0].curve[0].trained,
            "untrained": optimizers[best][0].curve[0].untrained,
        },
        "optimizers": optimizer_report,
        "rules": rule_report,
        "dp": dp_report,
        "wall_seconds_by_part": walls,
        "notes": notes(settings),
    }
    report["targets"] = {
        "federated_gap": {"target": "<= 0.05", "met": report["federated_gap"] <= 0.05},
        "poisoned_gap": {"target": "<= 0.05", "met": report["poisoned_gap"] <= 0.05},
    }
    report["findings"] = findings(report)
    return write_report(report, out, started=started)


def findings(report: Mapping[str, Any]) -> list[str]:
    """What the figures say against the targets, and what was tried where a target is missed, from the report's own
    numbers (so the text cannot drift from them)."""
    settings = report["settings"]
    best = report["federated_gap_optimizer"]
    gap = report["optimizers"][best]["federated_gap"]
    lines = [
        f"federated_gap {gap['mean']:.3f} ({gap['min']:.3f}-{gap['max']:.3f} over seeds) with {best} "
        f"{report['optimizers'][best]['config']} against centralised at lr {report['centralised']['learning_rate']:g}: "
        f"target <= 0.05 {'met' if report['targets']['federated_gap']['met'] else 'NOT met'}.",
    ]
    rule = report["poisoned_gap_rule"]
    entry = report["rules"][rule]
    attack = report["poisoned_gap_attack"]
    worst = {
        name: f"{value['worst_attack']} {value['worst_attack_poisoned_gap']:.3f}"
        for name, value in report["rules"].items()
    }
    line = (
        f"poisoned_gap {report['poisoned_gap']:.3f} for the selected default {rule} (worst attack: {attack}): target "
        f"<= 0.05 {'met' if report['targets']['poisoned_gap']['met'] else 'NOT met'}. Worst attack per rule: {worst}."
    )
    if not report["targets"]["poisoned_gap"]["met"]:
        attacked = entry["scenarios"][attack].get("attacked_domain", {}).get("domain")
        if attacked is not None:
            clean = entry["scenarios"]["none"]["domain_loss_mean"][attacked]
            hit = entry["scenarios"][attack]["domain_loss_mean"][attacked]
            line += f" The attack takes the attacked domain {attacked}'s held-out loss from {clean:.2f} to {hit:.2f}."
            if attack == "sign_flip" and entry["config"].get("min_cosine") is not None:
                line += (
                    " The direction screen drops the flipped update, but with non-IID devices the one honest device "
                    "on its domain points the other way from it too and is dropped with it, so that domain is not "
                    "trained."
                )
            elif attack == "sign_flip":
                line += (
                    " A flipped update has an honest norm and honest claims, so the norm bound and the share cap leave "
                    "it alone, and with non-IID devices only one honest device shares its domain, so trimming and the "
                    "median cannot tell which of the two is honest."
                )
        line += (
            f" Tried: the local lr grid {settings['learning_rate_grid']} for both sides, "
            f"{sum(len(grid) for grid in settings['optimizer_grids'].values())} server-optimiser grid points, and the "
            f"rules {sorted(settings['rules'])} (every defence the library has: norm bound, share cap, trimming, "
            "coordinate median, claim-history bound, direction screen)."
        )
    lines.append(line)
    base = report["base_loss"]["trained"]
    for key, value in report["dp"].items():
        loss = value["trained_loss"]["mean"]
        verdict = (
            f"worse than the base: the noise of central DP at K = {settings['devices']} swamps the update"
            if loss > base
            else "better than the base"
        )
        lines.append(
            f"DP epsilon {key} (accounted {value['epsilon_accounted']:.3f}, z {value['noise_multiplier']:.2f}, "
            f"C {value['clip_norm']:.2f}, noise std {value['noise_std_per_coordinate']:.2f} a coordinate): "
            f"trained-domain loss {loss:.2f} against the base's {base:.2f}, {verdict}."
        )
    return lines


def notes(settings: FederatedBenchSettings) -> list[str]:
    """What the figures mean, stated in the JSON next to them."""
    layout = ", ".join(settings.trained_domains[index] for index in settings.device_domains)
    return [
        f"Devices (one domain each): {layout}; device {settings.attacker} is the attacker in the poisoning scenarios "
        "(it trains honestly, then transforms its update). Untrained domains: every domain of the corpus not listed.",
        "Held-out loss = mean next-token loss over every held-out target token of the trained (untrained) domains.",
        "federated_gap = (federated - centralised) / centralised trained-domain loss, per seed, mean over seeds; "
        "federated is the best optimiser (chosen on the tuning seed) with the plain weighted mean after all rounds.",
        "poisoned_gap = (poisoned - clean) / clean trained-domain loss of the same rule and optimiser, per seed, "
        "mean over seeds, worst attack; gap_vs_undefended_clean compares with the undefended weighted mean's clean run "
        "instead. The default rule is selected on the reported seeds (selection_rules.default_rule), so its poisoned "
        "gap carries that selection.",
        "Centralised trains one LoRA for rounds x devices x local_steps steps of the same rows and seq_len on the "
        "union of the devices' records: real_tokens_per_seed shows that both sides trained on the same number of "
        "real tokens.",
        "Inflated claims: the attacker claims claim_inflation x its trained tokens and routed tokens from its first "
        "update on, so its own claim history (what bound_claimed_tokens compares against) is inflated too.",
        "DP: DP-FedAvg as combine_window implements it (whole-update clip C, uniform weights, Gaussian noise of std "
        "z*C/K on every coordinate, K = 5); epsilon_accounted is dp-accounting's RDP epsilon after the rounds, no "
        "subsampling amplification claimed. The bench seeds the noise generator for reproducibility.",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    parser.add_argument("--seeds", default=None, help="comma-separated reported seeds (default 0,1,2)")
    parser.add_argument("--rounds", type=int, default=None, help="synchronous rounds per federation (default 10)")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: one seed, 3 rounds, one grid point per optimiser, eps = 8"
    )
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
    if args.seeds is not None:
        overrides["seeds"] = tuple(int(seed) for seed in args.seeds.split(",") if seed.strip())
    if args.rounds is not None:
        overrides["rounds"] = args.rounds
    settings = FederatedBenchSettings(**overrides)
    report = run_benchmark(settings, args.out)
    keys = ("federated_gap", "federated_gap_optimizer", "poisoned_gap", "poisoned_gap_rule", "recommended_default")
    print(json.dumps({key: report[key] for key in keys} | {"wall_seconds": report["wall_seconds"]}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
