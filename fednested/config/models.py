"""Typed tier1 (cluster) and tier2 (edge device) configurations; every field carries the description that
`fednested init-config` writes as a comment into the sample file.

The tier2 sections `adapter`, `training` and `retry` are the dataclasses the edge code runs on (ExpertLoraConfig,
EdgeTrainConfig, RetryPolicy), used here as they are: their defaults, bounds and help texts are declared once, in
those dataclasses. They live in this package, not beside the code that uses them, because this package must not
import torch: the CLI (`fednested init-config`, `fednested config validate`) loads configs without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fednested.config.adapter import ExpertLoraConfig
from fednested.config.retry import RetryPolicy
from fednested.config.training import EdgeTrainConfig, Precision, SafeguardConfig
from fednested.messaging.settings import BusSettings, EmbeddedBusSettings

ConfigKind = Literal["tier1", "tier2"]


class ConfigModel(BaseModel):
    """Base of every config section: unknown keys are errors (a typo must not silently fall back to a default).

    The dataclass sections refuse unknown keys too: a dataclass takes no keyword it does not declare.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


class EdgeDataSettings(ConfigModel):
    """The device's private training data."""

    train_files: list[Path] = Field(
        min_length=1,
        description="JSONL files with the private training records (text, prompt/completion or chat messages). "
        "They never leave the device.",
        examples=[["data/train.jsonl"]],
    )
    strict: bool = Field(
        default=False,
        description="Stop at the first malformed record instead of skipping it (skipped lines are reported).",
    )


class EdgeModelSettings(ConfigModel):
    """How the frozen base snapshot is held in memory."""

    quantize_bits: Literal[0, 4, 8] = Field(
        default=0, description="Quantize the frozen base weights to 8 or 4 bits to save memory; 0 keeps full precision."
    )
    lean_allocator: bool = Field(
        default=True,
        description="With a quantized base, hand each dequantised weight buffer back to the system when it is freed "
        "(glibc's mmap threshold pinned): peak memory well below the default allocator's (NF4 medium preset: 547 MB "
        "instead of 1,306 MB above baseline) at the cost of training speed (tiny preset NF4: 40-50% fewer "
        "tokens/s; docs/benchmarks.md). false: the faster, hungrier default allocator.",
    )


class Tier2Config(ConfigModel):
    """An edge device (Tier 2/3): trains per-expert adapters on private data and sends only adapter deltas."""

    kind: Literal["tier2"] = Field(default="tier2", description="Which configuration this is: tier2 (edge device).")
    client_id: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$",
        description="This device's id; becomes the CN of its client certificate at enrollment.",
        examples=["edge-0001"],
    )
    display_name: str | None = Field(default=None, description="Name shown to officers in the control plane UI.")
    control_plane_url: str = Field(description="Base URL of the control plane API.", examples=["http://127.0.0.1:8000"])
    control_plane_ca_file: Path | None = Field(
        default=None,
        description="CA certificate(s) to trust for an https:// control plane (the federation CA, `fednested ca "
        "init`); without it the system's trust store is used. After enrollment the device presents its client "
        "certificate (mTLS) on https.",
        examples=["secrets/federation-ca.crt"],
    )
    enrollment_token_file: Path = Field(
        description="File holding the one-time enrollment token an officer issued for this device.",
        examples=["secrets/enrollment-token"],
    )
    state_dir: Path = Field(
        default=Path("state"), description="Where the device keeps its certificate, snapshots and run state."
    )
    sidecar_policy_path: Path = Field(
        description="The sidecar's static policy (allowed endpoints, payload fields, tensor names, size limits).",
        examples=["policy.yaml"],
    )
    audit_log_path: Path = Field(
        default=Path("state/audit/audit.jsonl"),
        description="Hash-chained local audit log; stays on the device, never shipped.",
    )
    spool_dir: Path = Field(
        default=Path("state/spool"),
        description="Outbox for updates and telemetry not yet acknowledged; survives restarts.",
    )
    http_timeout_s: float = Field(default=30.0, gt=0, description="Timeout of one control plane request, in seconds.")
    poll_interval_s: float = Field(default=0.5, gt=0, description="How long one wait for control events lasts.")
    champion_check_interval_s: float = Field(
        default=300.0,
        ge=5.0,
        le=86_400.0,
        description=(
            "How often the device asks the control plane for the champion even without a ModelAvailable event, in "
            "seconds: a lost event then costs at most this long, not a restart."
        ),
    )
    data: EdgeDataSettings = Field(description="Private training data.")
    model: EdgeModelSettings = Field(default_factory=EdgeModelSettings, description="Frozen base snapshot.")
    adapter: ExpertLoraConfig = Field(default_factory=ExpertLoraConfig, description="Per-expert LoRA adapters.")
    training: EdgeTrainConfig = Field(
        default_factory=EdgeTrainConfig,
        description="Local adapter training; the first of max_steps, max_epochs and max_seconds reached ends a run.",
    )
    retry: RetryPolicy = Field(default_factory=RetryPolicy, description="Back-off for network calls.")
    bus: BusSettings = Field(
        default_factory=EmbeddedBusSettings,
        description="Event bus: kind embedded (an SQLite file shared on one machine, the demo) "
        "or kind kafka (with bootstrap_servers: HOST:PORT).",
    )

    @field_validator("control_plane_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, got {url!r}")
        return url.rstrip("/")


class Tier1ModelSettings(ConfigModel):
    """The MoE model the cluster trains: a named preset built from its config, or a local directory."""

    preset: str = Field(default="tiny", min_length=1, description="Named model shape (tiny, small) used without path.")
    family: Literal["mixtral", "qwen2_moe"] = Field(default="mixtral", description="Transformers MoE family.")
    path: Path | None = Field(
        default=None, description="Local Hugging Face model directory; overrides preset. Nothing is downloaded."
    )
    seed: int = Field(default=0, ge=0, description="Seed for initialising a preset model.")


class Tier1TrainingSettings(ConfigModel):
    """Core and expert training on the cluster's data."""

    train_files: list[Path] = Field(default_factory=list, description="JSONL training files on cluster storage.")
    eval_files: list[Path] = Field(default_factory=list, description="JSONL validation files.")
    seq_len: int = Field(default=256, ge=8, description="Tokens per training row.")
    rows_per_batch: int = Field(default=8, ge=1, description="Rows per micro-batch per device.")
    grad_accum_steps: int = Field(default=1, ge=1, description="Micro-batches accumulated per optimizer step.")
    learning_rate: float = Field(default=3e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear learning-rate warm-up steps.")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Gradient clipping norm; null disables it.")
    max_steps: int = Field(default=1000, ge=1, description="Optimizer steps of one core update.")
    seed: int = Field(default=0, ge=0, description="Seed for data order and dropout.")
    precision: Precision = Field(default="auto", description="auto: bf16 on CUDA, fp32 on CPU.")
    ranks: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Training processes (DeepSpeed ranks) the core update launches on this machine: one per GPU, "
        "or CPU processes on the CPU accelerator.",
    )
    zero_stage: Literal[0, 1, 2] = Field(
        default=2,
        description="DeepSpeed ZeRO stage: 1 partitions optimizer state across ranks, 2 also gradients. Stage 3 "
        "(partitioned weights) is not supported by the core update, which reads whole weights on rank 0.",
    )
    offload_optimizer: bool = Field(
        default=False,
        description="ZeRO-Offload: keep optimizer state in host memory and step it on the CPU (DeepSpeedCPUAdam). "
        "CUDA only: on the CPU accelerator the state is in host memory already, so it is refused.",
    )
    train_gate: bool = Field(
        default=False,
        description="Train the routers (gates) with the core and experts. Off keeps routing stable for the "
        "adapters edge devices train on the experts.",
    )
    deepspeed_config: Path | None = Field(
        default=None,
        description="Extra DeepSpeed JSON merged over the config built from these settings (e.g. communication or "
        "logging options). It may not set the optimizer or scheduler (use the fields above), and a batch-size "
        "triple that does not multiply out is refused before any rank starts.",
    )


class Tier1FaultInjection(ConfigModel):
    """A deliberate crash, to rehearse what a failed core update leaves behind (a failed job, no version)."""

    rank: int = Field(ge=0, description="The rank that raises.", examples=[1])
    after_step: int = Field(ge=0, description="It raises once this many optimizer steps are done.", examples=[1])


class Tier1CoreUpdateSettings(ConfigModel):
    """`fednested tier1 core-update`: which champion to train, where the candidate goes, how deltas combine.

    W_core <- W_core + eta_core * dW_core; W_experts <- W_experts + eta_t1 * dW_T1 + eta_t2 * dW_edges.
    """

    champion_dir: Path | None = Field(
        default=None,
        description="Version directory of the champion to train (its tokenizer is used too). Required to run.",
        examples=["artifacts/versions/v1"],
    )
    output_dir: Path = Field(
        default=Path("artifacts/versions"),
        description="Where the candidate version directory is created (as <output_dir>/<version id>).",
    )
    eta_core: float = Field(default=1.0, ge=0, le=10, description="Step size applied to the core's trained delta.")
    eta_t1: float = Field(
        default=1.0, ge=0, le=10, description="Step size applied to the experts' (and gates') Tier-1 trained delta."
    )
    eta_t2: float = Field(
        default=1.0, ge=0, le=10, description="Step size applied to the edge aggregates' expert delta dW_edges."
    )
    accelerator: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="DeepSpeed accelerator: auto picks cuda when a GPU is visible, else cpu (gloo collectives).",
    )
    cpu_shm_comm: bool = Field(
        default=False,
        description="CPU accelerator only: use DeepSpeed's shared-memory all-reduce kernel instead of plain gloo. "
        "It is a C++ op compiled on first use (minutes; cached under TORCH_EXTENSIONS_DIR).",
    )
    master_port: int = Field(default=0, ge=0, le=65535, description="Rendezvous port on 127.0.0.1; 0 picks a free one.")
    timeout_s: float = Field(
        default=3600.0,
        gt=0,
        le=7 * 86_400,
        description="Wall-clock limit of the whole run; the ranks are killed after.",
    )
    fault_injection: Tier1FaultInjection | None = Field(
        default=None,
        description="Rehearsal only: make one rank raise after a given step. Leave null in production.",
    )
    dataset_policies: Path | None = Field(
        default=None,
        description="Apache Ranger-format policy JSON (docs/dataset-policies.md): when set, each training file is "
        "read only if a policy allows `principal` to read it, decided before any byte of it is read. Null: no check "
        "(the command runs with the operator's own file permissions).",
    )
    principal: str = Field(
        default="svc-tier1", min_length=1, max_length=1024, description="Service principal the policies decide for."
    )
    principal_groups: list[str] = Field(default_factory=list, description="Groups of the service principal.")
    principal_roles: list[str] = Field(default_factory=list, description="Roles of the service principal.")
    safeguards: SafeguardConfig = Field(
        default_factory=SafeguardConfig,
        description="Anti-forgetting safeguards of the core update, all off by default (docs/tier1-core-update.md, "
        "'Safeguards against forgetting'): EWC against the champion's shipped fisher.safetensors on the expert "
        "weights; freeze_layers holds every tensor of those decoder layers, freeze_experts those experts' slices of "
        "the fused expert tensors, freeze_gate the routers, bitwise; replay and distillation (from a frozen copy of "
        "the champion) use the champion's shipped replay.jsonl. A safeguard whose file the champion lacks is "
        "refused before any rank starts.",
    )


class StorageSettings(ConfigModel):
    """Where artifacts, checkpoints and runs are kept."""

    artifact_root: Path = Field(
        default=Path("artifacts"), description="Artifact store root: model versions and uploaded adapter deltas."
    )
    checkpoint_dir: Path = Field(default=Path("checkpoints"), description="Resumable training checkpoints.")
    mlflow_tracking_uri: str = Field(
        default="file:mlruns", min_length=1, description="MLflow tracking URI (a local store or an MLflow server)."
    )


class Tier1Config(ConfigModel):
    """A Tier-1 cluster: trains the core and the experts, aggregates edge deltas."""

    kind: Literal["tier1"] = Field(default="tier1", description="Which configuration this is: tier1 (cluster).")
    model: Tier1ModelSettings = Field(default_factory=Tier1ModelSettings, description="The MoE model.")
    training: Tier1TrainingSettings = Field(default_factory=Tier1TrainingSettings, description="Core/expert training.")
    core_update: Tier1CoreUpdateSettings = Field(
        default_factory=Tier1CoreUpdateSettings, description="Core update: champion, output, delta step sizes."
    )
    storage: StorageSettings = Field(default_factory=StorageSettings, description="Artifacts, checkpoints, runs.")
    bus: BusSettings = Field(
        default_factory=EmbeddedBusSettings,
        description="Event bus: kind embedded (an SQLite file shared on one machine, the demo) "
        "or kind kafka (with bootstrap_servers: HOST:PORT).",
    )


CONFIG_MODELS: dict[ConfigKind, type[Tier1Config] | type[Tier2Config]] = {"tier1": Tier1Config, "tier2": Tier2Config}
