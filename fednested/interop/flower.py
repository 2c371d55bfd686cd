"""Flower (flwr) interop: fednested's edge training as a Flower `ClientApp` and its exact per-expert aggregation as a
Flower `ServerApp` strategy, so a team that already runs Flower gets the MoE federation without the control plane.

What crosses Flower each round: the server sends the fused expert tensors of the current global model (the only
weights aggregation changes) as an `ArrayRecord`; each client loads the same base version from its own disk, puts
those experts in, trains per-expert LoRA adapters on its local records with the device's own loop
(`edge_client.local_training`) and replies with the adapter factors as an `ArrayRecord` plus its example and
routed-token counts as a `MetricRecord`. The strategy checks every reply as the control plane's intake does
(`fednested.aggregation.validation`), rejects a bad one with its code and reason in the round's record and log, and
combines the rest with `combine_window`, the function the aggregation worker calls. See docs/interop-flower.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Flower reports usage events to its makers and checks for newer releases unless told not to (read once, when flwr is
# first imported), and Ray, which Flower's simulation engine starts, reports usage too; fednested reaches no host but
# package registries. A caller who imported flwr or ray earlier must set these themselves.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result
from torch import nn

from edge_client.local_training import train_local_adapters
from fednested.adapters import ExpertLoraConfig, attach_expert_adapters
from fednested.adapters.lora import layer_index
from fednested.aggregation.aggregate import expert_key
from fednested.aggregation.factors import AdapterFactors
from fednested.aggregation.rejections import RejectionCode, UpdateRejected
from fednested.aggregation.server_optimizers import ServerOptimizer
from fednested.aggregation.settings import RoundAggregationSettings
from fednested.aggregation.validation import validate_update
from fednested.aggregation.weights import UpdateFacts
from fednested.aggregation.window import combine_window
from fednested.checkpoints import load_version, save_version
from fednested.checkpoints.updates import save_update
from fednested.data.jsonl import read_jsonl
from fednested.data.tokenizer import load_tokenizer
from fednested.deltas import expert_param_shapes, merge_expert_deltas
from fednested.training.edge import EdgeTrainConfig

logger = logging.getLogger(__name__)

# Record names inside a Flower message. "arrays" and "config" are FedAvg's defaults, which configure_train fills.
GLOBAL_ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
ADAPTERS_KEY = "adapters"
METRICS_KEY = "metrics"
# The adapter config every client must train with, as JSON (a ConfigRecord holds no nested objects).
ADAPTER_CONFIG_KEY = "fednested-adapter-config"
# Flower's own name for the weight of a reply; here it is the update's example count (UpdateFacts.examples).
EXAMPLES_KEY = "num-examples"
TOKENS_KEY = "tokens"
TRAIN_LOSS_KEY = "train-loss"
# "routed-tokens/<layer>.<expert>": tokens the client's router sent to that expert (the aggregation's weights).
ROUTED_PREFIX = "routed-tokens/"
# A node config key naming the local JSONL file on a SuperNode (`flower-supernode --node-config 'data-path="…"'`).
DATA_PATH_KEY = "data-path"
# Set by Flower's simulation engine on every virtual node.
PARTITION_KEY = "partition-id"
# How many characters of a client's own error text the record keeps.
MAX_REASON_CHARS = 500


@dataclass
class FlowerRoundRecord:
    """What one Flower round did: the updates combined (with the facts their weights came from), the replies
    rejected with their code and reason, and `combine_window`'s evidence record (None when nothing was accepted)."""

    server_round: int
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: dict[str, dict[str, str]] = field(default_factory=dict)
    aggregation: dict[str, Any] | None = None
    weights: dict[str, dict[str, float]] = field(default_factory=dict)
    steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "server_round": self.server_round,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "aggregation": self.aggregation,
            "weights": self.weights,
            "steps": self.steps,
        }


@dataclass(frozen=True)
class _CheckedUpdate:
    source: AdapterFactors
    facts: UpdateFacts[str]
    total_norm: float
    adapters: dict[str, torch.Tensor]


def expert_arrays(model: nn.Module) -> ArrayRecord:
    """The fused expert tensors of `model` (what aggregation changes, and all a client needs from the server)."""
    parameters = dict(model.named_parameters())
    return ArrayRecord(
        {name: parameters[name].detach().to(torch.float32) for name in sorted(expert_param_shapes(model))}
    )


def load_expert_arrays(model: nn.Module, arrays: ArrayRecord) -> None:
    """Overwrite `model`'s fused expert tensors with the server's, after checking names, shapes and finiteness (a
    client must not train on a broken global model); raises ValueError naming what is wrong."""
    shapes = expert_param_shapes(model)
    missing, unknown = sorted(set(shapes) - set(arrays)), sorted(set(arrays) - set(shapes))
    if missing or unknown:
        raise ValueError(f"the server's arrays miss expert tensors {missing[:5]} and carry unknown ones {unknown[:5]}")
    parameters = dict(model.named_parameters())
    received = arrays.to_torch_state_dict()
    for name, tensor in received.items():
        if tuple(tensor.shape) != tuple(parameters[name].shape):
            raise ValueError(f"the server's {name} has shape {list(tensor.shape)}, the base has {list(shapes[name])}")
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"the server's {name} is not a finite float tensor")
    with torch.no_grad():
        for name, tensor in received.items():
            parameters[name].copy_(tensor.to(parameters[name].dtype))


# Without flwr installed (the dev environment, see requirements/interop.txt) mypy sees FedAvg as Any.
class FednestedStrategy(FedAvg):  # type: ignore[misc,unused-ignore]
    """Flower's FedAvg sampling and messaging, with fednested's intake checks and `combine_window` in place of
    Flower's parameter average. Every node trains each round (fraction 1), nothing is evaluated federatedly, and
    every update is on the current global model (staleness 0: Flower rounds are synchronous).

    `model` is the plain base model (no adapters); the strategy merges each round's steps into it, so after the run
    it is the federation's model. `rounds` holds one `FlowerRoundRecord` per round; with `record_dir`, each accepted
    update is also written as the control plane stores one (`save_update`: adapters.safetensors and a manifest) with
    the round's record beside it (round-<n>/round.json), so the aggregation can be replayed and audited later.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter_config: ExpertLoraConfig,
        settings: RoundAggregationSettings,
        *,
        base_version: str,
        min_nodes: int = 2,
        record_dir: Path | None = None,
    ) -> None:
        if settings.privacy is not None:
            # The control plane composes ε over every aggregation in its privacy ledger; a Flower run has none, so
            # it could not say what the noise it added guarantees.
            raise ValueError("differential privacy (round setting 'dp') needs the control plane's privacy ledger")
        if min_nodes < 1:
            raise ValueError(f"min_nodes must be >= 1, got {min_nodes}")
        if record_dir is not None and record_dir.exists() and any(record_dir.iterdir()):
            # Refused now rather than when round 1's directory turns out to exist, halfway into the run.
            raise ValueError(f"record_dir {record_dir} is not empty: give each run a directory of its own")
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=min_nodes,
            min_available_nodes=min_nodes,
            weighted_by_key=EXAMPLES_KEY,
            arrayrecord_key=GLOBAL_ARRAYS_KEY,
            configrecord_key=CONFIG_KEY,
        )
        self.model = model
        self.adapter_config = adapter_config
        self.settings = settings
        self.base_version = base_version
        self.record_dir = record_dir
        self.shapes = expert_param_shapes(model)
        # One optimiser for the whole run: the worker resumes the state saved with each champion, which is the same
        # state when every round's result becomes the next round's base, as here.
        self.optimizer = ServerOptimizer(settings.server_optimizer)
        self.rounds: list[FlowerRoundRecord] = []
        # Bounds what a reply may declare before anything is decoded: two factors per (param, expert) of the model.
        self.max_arrays = 2 * sum(shape[0] for shape in self.shapes.values())
        self.max_routed_keys = sum(shape[0] for shape in self.shapes.values())

    def summary(self) -> None:
        super().summary()
        logger.info(
            "fednested aggregation: %s, server optimiser %s, adapters rank %d alpha %g",
            self.settings.aggregation.method,
            self.settings.server_optimizer.name,
            self.adapter_config.rank,
            self.adapter_config.alpha,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[ADAPTER_CONFIG_KEY] = json.dumps(self.adapter_config.to_dict(), sort_keys=True)
        messages: Iterable[Message] = super().configure_train(server_round, arrays, config, grid)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check each reply, combine the accepted ones, merge the steps; never raises for what a client sent.

        Returns (None, metrics) when no reply was accepted: Flower then keeps the previous global arrays.
        """
        record = FlowerRoundRecord(server_round=server_round)
        checked: list[_CheckedUpdate] = []
        for message in replies:
            node = str(message.metadata.src_node_id)
            update_id = f"round-{server_round}-node-{node}"
            try:
                checked.append(self._checked_reply(message, update_id, node))
            except UpdateRejected as rejection:
                record.rejected[update_id] = {"client": node, "code": rejection.code.value, "reason": rejection.message}
                logger.warning(
                    "round %d: rejected the update of node %s (%s): %s",
                    server_round,
                    node,
                    rejection.code.value,
                    rejection.message,
                )
        # In update-id order, not arrival order: the same replies give bitwise the same aggregate, and a replay from
        # the recorded update files (round.json lists them sorted) adds them up in the same order.
        checked.sort(key=lambda update: update.source.update_id)
        if checked:
            self._combine(record, checked)
        self.rounds.append(record)
        if self.record_dir is not None:
            self._write_record(record, checked)
        codes = Counter(entry["code"] for entry in record.rejected.values())
        metrics = MetricRecord(
            {
                "updates-accepted": len(checked),
                "updates-rejected": len(record.rejected),
                "aggregation-steps": record.steps,
                **{f"rejected/{code}": count for code, count in sorted(codes.items())},
            }
        )
        return (expert_arrays(self.model) if checked else None), metrics

    def _combine(self, record: FlowerRoundRecord, checked: list[_CheckedUpdate]) -> None:
        def merge(key: str, step: torch.Tensor) -> None:
            # The optimiser's step already carries the server learning rate η (as in workers/aggregation.py).
            merge_expert_deltas(self.model, {key: step}, eta=1.0)

        result = combine_window(
            [update.source for update in checked],
            [update.facts for update in checked],
            self.settings,
            self.optimizer,
            merge,
            update_norms={update.source.update_id: update.total_norm for update in checked},
        )
        record.aggregation = result.record
        record.weights = result.weights
        record.steps = result.steps
        for update in checked:
            record.accepted[update.source.update_id] = {
                "client": update.facts.sender,
                "examples": update.facts.examples,
                "staleness": update.facts.staleness,
                "routed_tokens": dict(sorted(update.facts.routed_tokens.items())),
                "total_norm": update.total_norm,
            }

    def _checked_reply(self, message: Message, update_id: str, node: str) -> _CheckedUpdate:
        """The reply as an update the window may combine, or UpdateRejected saying what was wrong with it."""
        if message.has_error():
            reason = str(message.error.reason)[:MAX_REASON_CHARS]
            raise UpdateRejected(
                RejectionCode.MALFORMED,
                f"the client replied with an error (code {message.error.code}): {reason}",
                client_id=node,
            )
        content = message.content
        arrays_by_name, metrics_by_name = content.array_records, content.metric_records
        if set(arrays_by_name) != {ADAPTERS_KEY} or set(metrics_by_name) != {METRICS_KEY}:
            raise UpdateRejected(
                RejectionCode.MALFORMED,
                f"a reply carries one ArrayRecord {ADAPTERS_KEY!r} and one MetricRecord {METRICS_KEY!r}, this one "
                f"carries arrays {sorted(arrays_by_name)[:5]} and metrics {sorted(metrics_by_name)[:5]}",
                client_id=node,
            )
        adapters = self._decoded(arrays_by_name[ADAPTERS_KEY], node)
        validated = validate_update(adapters, self.adapter_config, self.shapes, self.settings.limits, client_id=node)
        examples, routed = self._claims(metrics_by_name[METRICS_KEY], node)
        facts = UpdateFacts(
            update_id=update_id,
            experts=validated.experts,
            staleness=0,
            examples=examples,
            routed_tokens=routed,
            sender=node,
        )
        source = AdapterFactors(update_id, validated.adapters, self.adapter_config.scale)
        return _CheckedUpdate(source=source, facts=facts, total_norm=validated.total_norm, adapters=validated.adapters)

    def _decoded(self, arrays: ArrayRecord, node: str) -> dict[str, torch.Tensor]:
        """The reply's arrays as tensors, refusing before decoding anything too many or too large to be adapters."""
        if len(arrays) > self.max_arrays:
            raise UpdateRejected(
                RejectionCode.OVERSIZED,
                f"{len(arrays)} arrays, the model has room for {self.max_arrays}",
                client_id=node,
            )
        declared = sum(len(array.data) for array in arrays.values())
        # Each array is an .npy file: its header (at most a few hundred bytes) comes on top of the tensor's bytes.
        if declared > self.settings.limits.max_bytes + 1024 * len(arrays):
            raise UpdateRejected(
                RejectionCode.OVERSIZED,
                f"the arrays take {declared} bytes, the limit is {self.settings.limits.max_bytes}",
                client_id=node,
            )
        tensors: dict[str, torch.Tensor] = {}
        for name, array in arrays.items():
            try:
                # Array.numpy reads .npy without pickles; torch refuses dtypes it has no tensor for.
                tensors[name] = torch.from_numpy(array.numpy().copy())
            except (ValueError, TypeError, OSError) as error:
                raise UpdateRejected(
                    RejectionCode.MALFORMED,
                    f"array {name[:200]!r} ({array.stype}, {array.dtype}) cannot be read as a tensor: "
                    f"{str(error)[:200]}",
                    client_id=node,
                ) from None
        return tensors

    def _claims(self, metrics: MetricRecord, node: str) -> tuple[int, dict[str, int]]:
        """(examples, routed tokens per expert) from the reply's metrics, checked: counts are non-negative integers
        and every routed-token key names an expert of the model."""
        examples = metrics.get(EXAMPLES_KEY)
        if not isinstance(examples, int) or isinstance(examples, bool) or examples < 0:
            raise UpdateRejected(
                RejectionCode.MALFORMED,
                f"metric {EXAMPLES_KEY!r} must be an integer >= 0, got {examples!r}",
                client_id=node,
            )
        experts = {
            expert_key(layer_index(name), expert) for name, shape in self.shapes.items() for expert in range(shape[0])
        }
        routed: dict[str, int] = {}
        for key, value in metrics.items():
            if not key.startswith(ROUTED_PREFIX):
                continue
            expert = key[len(ROUTED_PREFIX) :]
            if expert not in experts or not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UpdateRejected(
                    RejectionCode.MALFORMED,
                    f"metric {key[:80]!r} = {str(value)[:40]} is not a count >= 0 of tokens routed to an expert of "
                    f"the model ('{ROUTED_PREFIX}<layer>.<expert>')",
                    client_id=node,
                )
            routed[expert] = value
            if len(routed) > self.max_routed_keys:
                raise UpdateRejected(RejectionCode.MALFORMED, "more routed-token counts than experts", client_id=node)
        return examples, routed

    def _write_record(self, record: FlowerRoundRecord, checked: list[_CheckedUpdate]) -> None:
        assert self.record_dir is not None
        directory = self.record_dir / f"round-{record.server_round}"
        directory.mkdir(parents=True, exist_ok=False)
        # The base every update of this round trained on: the version, or the result of the previous Flower round.
        base = (
            self.base_version
            if record.server_round == 1
            else f"{self.base_version}+flower-round-{record.server_round - 1}"
        )
        for update in checked:
            save_update(
                update.adapters,
                directory / update.source.update_id,
                base_version=base,
                adapter_config=self.adapter_config,
                metadata={"flower": record.accepted[update.source.update_id]},
                update_id=update.source.update_id,
            )
        (directory / "round.json").write_text(json.dumps(record.to_dict(), indent=2, sort_keys=True, default=str))


@dataclass(frozen=True)
class FlowerServerConfig:
    """What the ServerApp federates: the base version (a fednested version directory), the adapters every client
    trains, the round's aggregation settings (the same keys as a control-plane round config), and the run's shape."""

    version_dir: Path
    adapter: ExpertLoraConfig
    round_settings: RoundAggregationSettings = field(default_factory=RoundAggregationSettings)
    num_rounds: int = 3
    min_nodes: int = 2
    # How long a round waits for replies; a node that has not answered by then is left out of that round.
    round_timeout_s: float = 600.0
    record_dir: Path | None = None
    # Where the federated model is saved as a fednested version after the last round (None: not saved).
    output_version_dir: Path | None = None
    output_version_id: str | None = None

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {self.num_rounds}")
        if not (math.isfinite(self.round_timeout_s) and self.round_timeout_s > 0):
            raise ValueError(f"round_timeout_s must be a finite number > 0, got {self.round_timeout_s}")


class FednestedServer:
    """A Flower `ServerApp` (`.app`) that runs `FednestedStrategy`; after a run, `.strategy` holds the merged model
    and the round records, and `.result` Flower's `Result` (in the ServerApp's own process)."""

    def __init__(self, config: FlowerServerConfig) -> None:
        self.config = config
        self.strategy: FednestedStrategy | None = None
        self.result: Result | None = None
        self.app = ServerApp()

        def main(grid: Grid, context: Context) -> None:
            self.run(grid)

        self.app.main()(main)

    def run(self, grid: Grid) -> Result:
        config = self.config
        model, manifest = load_version(config.version_dir)
        strategy = FednestedStrategy(
            model,
            config.adapter,
            config.round_settings,
            base_version=manifest.version_id,
            min_nodes=config.min_nodes,
            record_dir=config.record_dir,
        )
        self.strategy = strategy
        self.result = strategy.start(
            grid=grid,
            initial_arrays=expert_arrays(model),
            num_rounds=config.num_rounds,
            timeout=config.round_timeout_s,
            train_config=ConfigRecord(),
        )
        if config.output_version_dir is not None:
            has_tokenizer = any(entry.partition == "tokenizer" for entry in manifest.files.values())
            save_version(
                model,
                config.output_version_dir,
                version_id=config.output_version_id or f"{manifest.version_id}-flower-{config.num_rounds}",
                parent_version=manifest.version_id,
                tokenizer=load_tokenizer(config.version_dir) if has_tokenizer else None,
                lineage={"flower": [record.to_dict() for record in strategy.rounds]},
            )
        return self.result


@dataclass(frozen=True)
class FlowerClientConfig:
    """What a ClientApp trains on: the base version on the node's disk (the same one the server federates), the
    edge training settings, and the local data: the node config's `data-path`, or in Flower's simulation engine
    `data_files[partition-id]`."""

    version_dir: Path
    training: EdgeTrainConfig
    data_files: tuple[Path, ...] = ()


def node_data_path(context: Context, config: FlowerClientConfig) -> Path:
    """The node's JSONL file: its `data-path` node config, else its simulation partition's entry in `data_files`."""
    node_config = context.node_config
    if DATA_PATH_KEY in node_config:
        return Path(str(node_config[DATA_PATH_KEY]))
    partition = node_config.get(PARTITION_KEY)
    if isinstance(partition, int) and not isinstance(partition, bool) and 0 <= partition < len(config.data_files):
        return config.data_files[partition]
    raise ValueError(
        f"node {context.node_id} has no {DATA_PATH_KEY!r} in its node config and its {PARTITION_KEY!r} "
        f"({partition!r}) picks none of the {len(config.data_files)} data_files"
    )


def train_on_node(message: Message, context: Context, config: FlowerClientConfig) -> Message:
    """One client round: the base version with the server's experts, adapters trained on the node's records, and
    the reply (adapter factors, example and routed-token counts). Raises on bad input; Flower turns that into an
    error reply, which the strategy records as a rejection."""
    content = message.content
    if GLOBAL_ARRAYS_KEY not in content.array_records or CONFIG_KEY not in content.config_records:
        raise ValueError(f"a train message carries ArrayRecord {GLOBAL_ARRAYS_KEY!r} and ConfigRecord {CONFIG_KEY!r}")
    raw_adapter = content.config_records[CONFIG_KEY].get(ADAPTER_CONFIG_KEY)
    if not isinstance(raw_adapter, str):
        raise ValueError(f"the server's config has no {ADAPTER_CONFIG_KEY!r} (JSON of an ExpertLoraConfig)")
    adapter_config = ExpertLoraConfig.from_dict(json.loads(raw_adapter))
    records = read_jsonl(node_data_path(context, config), strict=True).records
    model, _ = load_version(config.version_dir)
    load_expert_arrays(model, content.array_records[GLOBAL_ARRAYS_KEY])
    tokenizer = load_tokenizer(config.version_dir)
    adapted = attach_expert_adapters(model, adapter_config)
    result = train_local_adapters(adapted, tokenizer, records, config.training)
    metrics = MetricRecord({EXAMPLES_KEY: result.examples, TOKENS_KEY: result.metrics.tokens})
    if math.isfinite(result.metrics.final_loss):
        metrics[TRAIN_LOSS_KEY] = result.metrics.final_loss
    for expert, tokens in result.routed_tokens.items():
        metrics[f"{ROUTED_PREFIX}{expert}"] = tokens
    reply = RecordDict({ADAPTERS_KEY: ArrayRecord(result.adapters), METRICS_KEY: metrics})
    return Message(content=reply, reply_to=message)


def make_client_app(
    config: FlowerClientConfig, train: Callable[[Message, Context, FlowerClientConfig], Message] = train_on_node
) -> ClientApp:
    """A Flower `ClientApp` whose train handler is `train` (fednested's `train_on_node` unless given)."""
    app = ClientApp()

    def handle(message: Message, context: Context) -> Message:
        return train(message, context, config)

    app.train()(handle)
    return app
