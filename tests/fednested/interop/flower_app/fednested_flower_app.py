"""The Flower app that tests/fednested/interop/test_flower.py runs on a loopback SuperLink: fednested's ServerApp and
ClientApp, configured from the run config the test writes into the app's pyproject.toml, plus one node (node config
`bad-shapes=true`) that answers with adapters of the wrong shape. It is also the smallest example of a Flower app
around `fednested.interop.flower` (docs/interop-flower.md). The test copies this file next to a generated
pyproject.toml; Flower's processes import it from the installed app, with the checkout on PYTHONPATH.

fednested is imported inside the handlers, not here: the SuperNode starts a new ClientApp process for every message,
and importing fednested (torch, PEFT) is most of such a process's time, which the wrong-shapes node does not need.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def serve(grid: Grid, context: Context) -> None:
    from fednested.adapters import ExpertLoraConfig
    from fednested.aggregation.settings import RoundAggregationSettings
    from fednested.interop.flower import FednestedServer, FlowerServerConfig

    config = context.run_config
    out = Path(str(config["out-dir"]))
    server = FednestedServer(
        FlowerServerConfig(
            version_dir=Path(str(config["version-dir"])),
            adapter=ExpertLoraConfig(rank=int(config["rank"]), alpha=float(config["alpha"])),
            round_settings=RoundAggregationSettings.from_mapping(json.loads(str(config["round-settings"]))),
            num_rounds=int(config["num-rounds"]),
            min_nodes=int(config["min-nodes"]),
            round_timeout_s=float(config["round-timeout-s"]),
            record_dir=out / "rounds",
            output_version_dir=out / "federated",
        )
    )
    result = server.run(grid)
    # The ServerApp runs in a process of the SuperLink's; the test reads Flower's per-round metrics from this file.
    metrics = {str(server_round): dict(record) for server_round, record in result.train_metrics_clientapp.items()}
    (out / "train-metrics.json").write_text(json.dumps(metrics, sort_keys=True))


@client_app.train()
def train(message: Message, context: Context) -> Message:
    config = context.run_config
    if context.node_config.get("bad-shapes") is True:
        return _wrong_shapes(message, int(config["rank"]))
    from fednested.interop.flower import FlowerClientConfig, train_on_node
    from fednested.training import EdgeTrainConfig

    training = EdgeTrainConfig(
        seq_len=int(config["seq-len"]),
        rows_per_batch=2,
        max_steps=int(config["max-steps"]),
        precision="fp32",
        num_threads=1,
        seed=int(config["seed"]),
    )
    return train_on_node(message, context, FlowerClientConfig(Path(str(config["version-dir"])), training))


def _wrong_shapes(message: Message, rank: int) -> Message:
    """A reply without training whose adapters have the names fednested's ClientApp sends (see
    fednested.adapters.lora.adapter_key) but every lora_A one column too wide."""
    adapters: dict[str, Array] = {}
    for name, array in message.content.array_records["arrays"].items():
        _, out_features, in_features = array.shape
        for expert in range(2):
            adapters[f"{name}/expert={expert}/lora_A"] = Array(np.ones((rank, in_features + 1), dtype=np.float32))
            adapters[f"{name}/expert={expert}/lora_B"] = Array(np.zeros((out_features, rank), dtype=np.float32))
    content = RecordDict({"adapters": ArrayRecord(adapters), "metrics": MetricRecord({"num-examples": 1})})
    return Message(content, reply_to=message)
