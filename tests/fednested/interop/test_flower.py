"""fednested through Flower: two rounds on a SuperLink and three SuperNodes, real Flower processes on 127.0.0.1 only,
give exactly the model the control plane's aggregation makes of the same update files, and bad replies are rejected
with a reason while the round goes on. Runs in the venv `scripts/venv.sh flower` makes (the `flower` stage of
`make test`); skipped where flwr is missing."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr", reason="flwr is in the venv `scripts/venv.sh flower` makes, where make test runs this file")

import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from safetensors.torch import load_file

from fednested.adapters import ExpertLoraConfig
from fednested.adapters.lora import adapter_key
from fednested.aggregation import UpdateFacts, expert_of_delta
from fednested.aggregation.factors import FactorFile
from fednested.aggregation.server_optimizers import ServerOptimizer
from fednested.aggregation.settings import RoundAggregationSettings
from fednested.aggregation.validation import check_delta_norms
from fednested.aggregation.window import combine_window
from fednested.checkpoints import load_version, save_version
from fednested.data import BpeTokenizerConfig, CorpusConfig, generate_corpus, record_texts, train_bpe_tokenizer
from fednested.data.jsonl import write_jsonl
from fednested.deltas import expert_param_shapes, merge_expert_deltas
from fednested.interop.flower import (
    ADAPTERS_KEY,
    METRICS_KEY,
    FednestedStrategy,
    FlowerClientConfig,
    node_data_path,
)
from fednested.models import build_model
from fednested.training import EdgeTrainConfig

ADAPTER = ExpertLoraConfig(rank=4, alpha=8)
DOMAINS = ("medical", "legal", "code")
# The round config a new control-plane federation gets (norm bound, direction screen, FedAvgM with momentum), so the
# second round also checks that the server optimiser's state carries over as the worker's does.
SETTINGS = RoundAggregationSettings.from_mapping({})


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny version with its tokenizer, and one JSONL file per client (a domain each; the fourth repeats one)."""
    root = tmp_path_factory.mktemp("flower")
    corpus = generate_corpus(CorpusConfig(seed=0, train_samples=16, heldout_samples=4))
    texts = [text for domain in corpus.values() for text in record_texts(domain.mixed_records("train"))]
    tokenizer = train_bpe_tokenizer(texts, BpeTokenizerConfig(vocab_size=384))
    model = build_model("tiny", vocab_size=len(tokenizer), seed=0)
    save_version(model, root / "v0", version_id="tiny-v0", parent_version=None, tokenizer=tokenizer)
    files = []
    for index, domain in enumerate((*DOMAINS, DOMAINS[0])):
        path = root / f"client-{index}.jsonl"
        write_jsonl(path, corpus[domain].mixed_records("train")[index : index + 12])
        files.append(path)
    return {"root": root, "version_dir": root / "v0", "data_files": tuple(files)}


def _random_adapters(shapes: dict[str, tuple[int, int, int]], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, (experts, out_features, in_features) in sorted(shapes.items()):
        for expert in range(min(experts, 2)):
            out[adapter_key(name, expert, "lora_A")] = torch.randn(ADAPTER.rank, in_features, generator=generator)
            out[adapter_key(name, expert, "lora_B")] = 0.01 * torch.randn(
                out_features, ADAPTER.rank, generator=generator
            )
    return out


def _reply(
    node: int, adapters: dict[str, torch.Tensor], metrics: dict[str, Any], *, error: str = "", raw: Any = None
) -> Message:
    """A train reply from `node` as the Grid hands it to the strategy (content, or the client's error)."""
    metadata = Metadata(
        run_id=1,
        message_id=f"reply-{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id=f"train-{node}",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )
    if error:
        return make_message(metadata, error=Error(code=1, reason=error))
    arrays = raw if raw is not None else ArrayRecord.from_torch_state_dict(adapters)
    content = RecordDict({ADAPTERS_KEY: arrays, METRICS_KEY: MetricRecord(metrics)})
    return make_message(metadata, content=content)


def _routed(adapters: dict[str, torch.Tensor]) -> dict[str, int]:
    experts = {expert_of_delta(key.rpartition("/")[0]) for key in adapters}
    return {"num-examples": 5, **{f"routed-tokens/{expert}": 10 for expert in experts}}


def test_the_strategy_rejects_each_bad_reply_with_its_reason_and_combines_the_rest(federation: dict[str, Any]) -> None:
    model, manifest = load_version(federation["version_dir"])
    before = {name: tensor.detach().clone() for name, tensor in model.named_parameters()}
    strategy = FednestedStrategy(model, ADAPTER, SETTINGS, base_version=manifest.version_id, min_nodes=1)
    shapes = expert_param_shapes(model)
    good = _random_adapters(shapes, 0)
    name_a = sorted(key for key in good if key.endswith("lora_A"))[0]
    nan = dict(good) | {name_a: torch.full_like(good[name_a], math.nan)}
    wrong_keys = dict(good) | {"model.layers.0.mlp.experts.up_proj/expert=0/lora_A": good[name_a]}
    wrong_shape = dict(good) | {name_a: good[name_a][:, :-1]}
    error = _reply(9, {}, {}, error="CUDA out of memory")
    # An array that is not an .npy at all (a pickle, say): refused before anything would unpickle it.
    pickled = ArrayRecord.from_torch_state_dict(good)
    pickled[name_a] = Array(dtype="float32", shape=(4,), stype="torch.save", data=b"\x80\x04K\x01.")
    replies = [
        _reply(1, good, _routed(good)),
        _reply(2, nan, _routed(nan)),
        _reply(3, wrong_keys, _routed(good)),
        _reply(4, wrong_shape, _routed(good)),
        _reply(5, good, {"num-examples": -1}),
        _reply(6, good, {"num-examples": 1, "routed-tokens/99.0": 3}),
        _reply(7, good, _routed(good), raw=pickled),
        error,
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)

    record = strategy.rounds[0]
    assert list(record.accepted) == ["round-1-node-1"]
    assert {entry["client"]: entry["code"] for entry in record.rejected.values()} == {
        "2": "non_finite",
        "3": "bad_tensor_names",
        "4": "bad_shapes",
        "5": "malformed",
        "6": "malformed",
        "7": "malformed",
        "9": "malformed",
    }
    assert "holds" in record.rejected["round-1-node-2"]["reason"]
    assert name_a in record.rejected["round-1-node-2"]["reason"]
    assert "up_proj" in record.rejected["round-1-node-3"]["reason"]
    assert name_a in record.rejected["round-1-node-4"]["reason"]
    assert "expected" in record.rejected["round-1-node-4"]["reason"]
    assert "CUDA out of memory" in record.rejected["round-1-node-9"]["reason"]
    assert "torch.save" in record.rejected["round-1-node-7"]["reason"]
    assert metrics is not None
    assert metrics["updates-accepted"] == 1
    assert metrics["updates-rejected"] == 7
    assert metrics["rejected/malformed"] == 4
    assert metrics["rejected/bad_shapes"] == 1
    assert arrays is not None
    assert set(arrays) == set(shapes)
    changed = [name for name in shapes if not torch.equal(before[name], dict(model.named_parameters())[name])]
    assert changed, "the accepted update must move the experts it carries"

    # A round in which every reply is bad completes too; Flower then keeps the previous arrays (None).
    arrays, metrics = strategy.aggregate_train(2, [_reply(4, wrong_shape, _routed(good)), error])
    assert arrays is None
    assert metrics is not None
    assert metrics["updates-rejected"] == 2
    assert strategy.rounds[1].aggregation is None
    assert len(strategy.rounds[1].rejected) == 2


def test_the_strategy_refuses_dp_and_a_record_dir_in_use(federation: dict[str, Any], tmp_path: Path) -> None:
    model, manifest = load_version(federation["version_dir"])
    private = RoundAggregationSettings.from_mapping({"dp": {"noise_multiplier": 1.0, "clip_norm": 1.0}})
    with pytest.raises(ValueError, match="privacy ledger"):
        FednestedStrategy(model, ADAPTER, private, base_version=manifest.version_id)
    (tmp_path / "round-1").mkdir()
    with pytest.raises(ValueError, match="is not empty"):
        FednestedStrategy(model, ADAPTER, SETTINGS, base_version=manifest.version_id, record_dir=tmp_path)


def test_a_node_reads_its_data_path_or_its_simulation_partition(federation: dict[str, Any]) -> None:
    config = FlowerClientConfig(federation["version_dir"], EdgeTrainConfig(), data_files=federation["data_files"])

    def context(node_config: dict[str, Any]) -> Context:
        return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})

    assert node_data_path(context({"partition-id": 2}), config) == federation["data_files"][2]
    assert node_data_path(context({"data-path": "/data/local.jsonl", "partition-id": 0}), config) == Path(
        "/data/local.jsonl"
    )
    with pytest.raises(ValueError, match="picks none of the 4 data_files"):
        node_data_path(context({"partition-id": 4}), config)


def _replay_like_the_worker(version_dir: Path, record_dir: Path, rounds: int) -> dict[str, torch.Tensor]:
    """What the control plane makes of the recorded update files: the worker's FactorFile reader, its norm re-check
    and `combine_window` with the round's settings, merged with η = 1, round after round on one optimiser."""
    model, _ = load_version(version_dir)
    optimizer = ServerOptimizer(SETTINGS.server_optimizer)
    for server_round in range(1, rounds + 1):
        directory = record_dir / f"round-{server_round}"
        record = json.loads((directory / "round.json").read_text())
        sources, facts, norms = [], [], {}
        for update_id, entry in sorted(record["accepted"].items()):
            factors = FactorFile(update_id, directory / update_id / "adapters.safetensors", ADAPTER.scale)
            per_key = {key: factors.read(key).norm() for key in sorted(factors.delta_keys())}
            check_delta_norms(per_key, SETTINGS.limits, client_id=entry["client"])
            norms[update_id] = math.sqrt(sum(value * value for value in per_key.values()))
            sources.append(factors)
            facts.append(
                UpdateFacts(
                    update_id=update_id,
                    experts=frozenset(expert_of_delta(key) for key in factors.delta_keys()),
                    staleness=0,
                    examples=entry["examples"],
                    routed_tokens=entry["routed_tokens"],
                    sender=entry["client"],
                )
            )

        def merge(key: str, step: torch.Tensor) -> None:
            merge_expert_deltas(model, {key: step}, eta=1.0)

        combine_window(sources, facts, SETTINGS, optimizer, merge, update_norms=norms)
    parameters = dict(model.named_parameters())
    return {name: parameters[name].detach().clone() for name in expert_param_shapes(model)}


APP_MODULE = Path(__file__).parent / "flower_app" / "fednested_flower_app.py"
CHECKOUT = Path(__file__).resolve().parents[3]
# Each process, and the whole run, is bounded: a SuperLink or SuperNode that hangs must not hold the suite.
STARTUP_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 240.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _app_pyproject(run_config: dict[str, Any]) -> str:
    """A Flower app's pyproject.toml: the components in the copied module and the run config they read."""
    config = "\n".join(f"{key} = {json.dumps(value)}" for key, value in run_config.items())
    return f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fednested-flower-test"
version = "1.0.0"
description = "fednested through a loopback Flower SuperLink (tests/fednested/interop/test_flower.py)"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fednested"

[tool.flwr.app.components]
serverapp = "fednested_flower_app:server_app"
clientapp = "fednested_flower_app:client_app"

[tool.flwr.app.config]
{config}
"""


class _LoopbackFlower:
    """A SuperLink, SuperNodes and `flwr run` as separate processes, each with its own Flower home and its log in a
    file, shown when a step fails; `stop` ends them and every process they started."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = Path(sys.executable).parent
        self.processes: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self.env = dict(os.environ)
        self.env.update(
            {
                # Flower's processes import fednested (and the app module imports it) from this checkout.
                "PYTHONPATH": os.pathsep.join([str(CHECKOUT), self.env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                # No usage reports, no update checks: the processes reach nothing but each other.
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "OMP_NUM_THREADS": "1",
                # The SuperLink and SuperNodes start flower-superexec, which starts flwr-serverapp/flwr-clientapp.
                "PATH": os.pathsep.join([str(self.bin), self.env.get("PATH", "")]),
            }
        )

    def start(self, name: str, *args: str) -> None:
        log = self.root / f"{name}.log"
        home = self.root / "home" / name
        home.mkdir(parents=True)
        with log.open("wb") as out:
            process = subprocess.Popen(
                [str(self.bin / args[0]), *args[1:]],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                env=self.env | {"FLWR_HOME": str(home)},
                start_new_session=True,
            )
        self.processes[name] = (process, log)

    def logs(self) -> str:
        tails = []
        for name, (process, log) in self.processes.items():
            text = log.read_text(errors="replace") if log.exists() else ""
            tails.append(f"--- {name} (exit {process.poll()}) ---\n{text[-3000:]}")
        return "\n".join(tails)

    def wait_listening(self, port: int) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return
            if any(process.poll() is not None for process, _ in self.processes.values()):
                break
            time.sleep(0.2)
        pytest.fail(f"nothing listens on 127.0.0.1:{port} after the SuperLink started\n{self.logs()}")

    def stop(self) -> None:
        """End every process started here and every one they started (SuperExec and the app processes run in
        sessions of their own, so a process group would miss them): TERM, ten seconds, then KILL."""
        # A pid with its start time names one process; a pid that has been reused since is left alone.
        tree = {pid: _started_at(pid) for pid in _process_tree(process.pid for process, _ in self.processes.values())}
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process, _ in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for pid, started in tree.items():
            if started is not None and _started_at(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for process, _ in self.processes.values():
            process.wait()


def _listening_addresses(pids: set[int]) -> set[str]:
    """The local addresses ("127.0.0.1:8000", "0.0.0.0:6379", "[::]:80") on which `pids` listen for TCP: what
    `ss -ltnp` shows, read from /proc so that the test needs no iproute2."""
    inodes: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[len("socket:[") : -1])
    addresses = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            host, port = fields[1].split(":")
            # The kernel prints each 32-bit word of the address in host (little-endian) order.
            packed = b"".join(bytes.fromhex(host[i : i + 8])[::-1] for i in range(0, len(host), 8))
            address = ipaddress.ip_address(packed)
            # An IPv6 socket bound to ::ffff:127.0.0.1 is reachable from loopback only, like 127.0.0.1.
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            addresses.add(f"{address}:{int(port, 16)}" if address.version == 4 else f"[{address}]:{int(port, 16)}")
    return addresses


def _started_at(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _process_tree(root_pids: Iterable[int]) -> set[int]:
    """`root_pids` and every process below them (from /proc, so no extra dependency)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rpartition(")")[2].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), list(root_pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


# Process starts (each imports flwr; every ClientApp and the ServerApp also torch and fednested) are most of it
# (docs/interop-flower.md); the bound keeps a hung process from holding the suite.
@pytest.mark.slow
@pytest.mark.timeout(360)
def test_two_rounds_on_a_loopback_superlink_equal_the_control_planes_aggregation(
    federation: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(APP_MODULE, app / APP_MODULE.name)
    run_config = {
        "version-dir": str(federation["version_dir"]),
        "out-dir": str(out),
        "rank": ADAPTER.rank,
        "alpha": ADAPTER.alpha,
        "round-settings": "{}",
        "num-rounds": 2,
        "min-nodes": 3,
        "round-timeout-s": 120.0,
        "seq-len": 64,
        "max-steps": 2,
        "seed": 3,
    }
    (app / "pyproject.toml").write_text(_app_pyproject(run_config))
    flower = _LoopbackFlower(tmp_path)
    link = _free_port()
    cli_home = tmp_path / "home" / "cli"
    cli_home.mkdir(parents=True)
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    try:
        flower.start(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(link),
            # The app's dependencies are the checkout's; nothing may be installed at run time.
            "--disable-runtime-dependency-installation",
        )
        flower.wait_listening(link)
        # Two nodes train (medical and legal records), the third answers with the wrong shapes. Every ClientApp is a
        # new process that imports torch and fednested, which is most of the test's time: hence three, not more.
        for index, data_file in enumerate(federation["data_files"][:3]):
            node_config = f'data-path="{data_file}"' + (" bad-shapes=true" if index == 2 else "")
            flower.start(
                f"supernode-{index}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link}",
                "--host",
                "127.0.0.1",
                "--port",
                str(_free_port()),
                "--node-config",
                node_config,
            )
        started = time.monotonic()
        log = tmp_path / "flwr-run.log"
        with log.open("wb") as run_log:
            submit = subprocess.Popen(
                [str(flower.bin / "flwr"), "run", str(app), "loopback", "--stream"],
                stdout=run_log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=tmp_path,
                env=flower.env | {"FLWR_HOME": str(cli_home)},
                start_new_session=True,
            )
        flower.processes["flwr-run"] = (submit, log)
        # While the run goes on, every process of it (SuperLink, SuperNodes and the ServerApp and ClientApp
        # processes they start) must listen on loopback only.
        listening: set[str] = set()
        while submit.poll() is None and time.monotonic() - started < RUN_TIMEOUT_S:
            listening |= _listening_addresses(_process_tree(process.pid for process, _ in flower.processes.values()))
            time.sleep(1.0)
        elapsed = time.monotonic() - started
        assert (out / "train-metrics.json").exists(), (
            f"the run wrote no results after {elapsed:.0f} s (flwr run exit {submit.poll()})\n{flower.logs()}"
        )
    finally:
        flower.stop()
    # The SuperLink's own port proves the sampling saw the processes' sockets; every address must be loopback.
    assert f"127.0.0.1:{link}" in listening, listening
    assert all(address.startswith("127.0.0.1:") for address in listening), f"beyond loopback: {sorted(listening)}"
    print(f"flwr run: {elapsed:.1f} s, listening on {sorted(listening)}")

    metrics = json.loads((out / "train-metrics.json").read_text())
    records = [json.loads((out / "rounds" / f"round-{n}" / "round.json").read_text()) for n in (1, 2)]
    for record in records:
        # Both good clients combined, the third rejected for its shapes, and the round went on.
        assert len(record["accepted"]) == 2, record
        assert record["steps"] > 0
        assert [entry["code"] for entry in record["rejected"].values()] == ["bad_shapes"], record["rejected"]
        assert "expected" in next(iter(record["rejected"].values()))["reason"]
        assert metrics[str(record["server_round"])]["updates-accepted"] == 2
        assert metrics[str(record["server_round"])]["updates-rejected"] == 1
        assert all(sum(entry["routed_tokens"].values()) > 0 for entry in record["accepted"].values())
    # Same node, seed and data in both rounds: its adapters differ only because round 2 started from round 1's result.
    for first_id, entry in records[0]["accepted"].items():
        second_id = f"round-2-node-{entry['client']}"
        first = load_file(out / "rounds" / "round-1" / first_id / "adapters.safetensors")
        second = load_file(out / "rounds" / "round-2" / second_id / "adapters.safetensors")
        assert first.keys() == second.keys()
        assert any(not torch.equal(first[key], second[key]) for key in first)

    # The federated model the ServerApp saved equals the control plane's aggregation of the same update files.
    replayed = _replay_like_the_worker(federation["version_dir"], out / "rounds", rounds=2)
    federated, manifest = load_version(out / "federated")
    assert manifest.parent_version == "tiny-v0"
    saved = {name: tensor.detach() for name, tensor in federated.named_parameters()}
    base, _ = load_version(federation["version_dir"])
    base_parameters = dict(base.named_parameters())
    assert set(expert_param_shapes(federated)) == set(replayed)
    for name, tensor in replayed.items():
        assert float((saved[name] - tensor).abs().max()) <= 1e-6, name
    assert max(float((replayed[name] - base_parameters[name].detach()).abs().max()) for name in replayed) > 1e-4
