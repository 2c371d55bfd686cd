"""Typed tier1 (cluster) and tier2 (edge device) configurations; every field carries the description that
`fednested init-config` writes as a comment into the sample file.

Field names mirror the dataclasses they feed (EdgeTrainConfig, ExpertLoraConfig, RetryPolicy), so callers build
those with `Dataclass(**section.model_dump())` without importing torch here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fednested.messaging.settings import BusSettings, EmbeddedBusSettings

ConfigKind = Literal["tier1", "tier2"]
Precision = Literal["auto", "fp32", "bf16"]


class ConfigModel(BaseModel):
    """Base of every config section: unknown keys are errors (a typo must not silently fall back to a default)."""

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


class AdapterSettings(ConfigModel):
    """Per-expert LoRA adapters: ΔW_e = (alpha / rank) · B_e · A_e."""

    rank: int = Field(default=8, ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(default=16.0, gt=0, description="LoRA scaling numerator; the delta is scaled by alpha / rank.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the adapter input during training.")
    layers: list[int] | None = Field(
        default=None, description="MoE layer indexes to adapt; null adapts every MoE layer."
    )
    experts: list[int] | None = Field(default=None, description="Expert indexes to adapt; null adapts every expert.")
    targets: list[str] = Field(
        default=["gate_up_proj", "down_proj"],
        min_length=1,
        description="Expert weight tensors that get adapters.",
    )
    init_seed: int = Field(default=0, ge=0, description="Seed for the initial A matrices (same seed, same adapters).")


class EdgeTrainingSettings(ConfigModel):
    """Local adapter training; the first of max_steps, max_epochs and max_seconds reached ends a run."""

    seq_len: int = Field(default=256, ge=8, description="Tokens per training row.")
    rows_per_batch: int = Field(default=4, ge=1, description="Rows per micro-batch.")
    grad_accum_steps: int = Field(default=1, ge=1, description="Micro-batches accumulated per optimizer step.")
    learning_rate: float = Field(default=2e-3, gt=0, description="AdamW learning rate of the adapters.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear learning-rate warm-up steps.")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Gradient clipping norm; null disables it.")
    max_steps: int | None = Field(default=100, ge=1, description="Optimizer steps per run; null for no step limit.")
    max_epochs: float | None = Field(default=None, gt=0, description="Passes over the data per run; null: no limit.")
    max_seconds: float | None = Field(default=None, gt=0, description="Wall-clock budget per run; null: no limit.")
    seed: int = Field(default=0, ge=0, description="Seed for data order and dropout.")
    precision: Precision = Field(
        default="auto",
        description="auto: bf16 autocast on CUDA, fp32 on CPU (measured faster there, docs/benchmarks.md).",
    )
    num_threads: int | None = Field(default=None, ge=1, description="CPU threads for training; null: PyTorch default.")

    @model_validator(mode="after")
    def _has_a_budget(self) -> Self:
        if self.max_steps is None and self.max_epochs is None and self.max_seconds is None:
            raise ValueError("set at least one of max_steps, max_epochs, max_seconds, or a run never ends")
        return self


class RetrySettings(ConfigModel):
    """Exponential back-off with jitter for calls to the control plane and the bus."""

    initial_delay_s: float = Field(default=0.5, ge=0, description="First wait after a failed attempt, in seconds.")
    multiplier: float = Field(default=2.0, ge=1, description="Each further wait grows by this factor.")
    max_delay_s: float = Field(default=30.0, ge=0, description="Upper bound of one wait, in seconds.")
    jitter: float = Field(
        default=0.5, ge=0, le=1, description="Each wait is scaled by a random factor in [1 - jitter, 1]."
    )
    max_attempts: int = Field(default=8, ge=1, description="Attempts before giving up (the spool keeps the payload).")

    @model_validator(mode="after")
    def _delays_ordered(self) -> Self:
        if self.max_delay_s < self.initial_delay_s:
            raise ValueError(f"max_delay_s {self.max_delay_s} is below initial_delay_s {self.initial_delay_s}")
        return self


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
    data: EdgeDataSettings = Field(description="Private training data.")
    model: EdgeModelSettings = Field(default_factory=EdgeModelSettings, description="Frozen base snapshot.")
    adapter: AdapterSettings = Field(default_factory=AdapterSettings, description="Per-expert LoRA adapters.")
    training: EdgeTrainingSettings = Field(default_factory=EdgeTrainingSettings, description="Local adapter training.")
    retry: RetrySettings = Field(default_factory=RetrySettings, description="Back-off for network calls.")
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
    deepspeed_config: Path | None = Field(
        default=None, description="DeepSpeed JSON config for multi-GPU training; null trains in one process."
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
    storage: StorageSettings = Field(default_factory=StorageSettings, description="Artifacts, checkpoints, runs.")
    bus: BusSettings = Field(
        default_factory=EmbeddedBusSettings,
        description="Event bus: kind embedded (an SQLite file shared on one machine, the demo) "
        "or kind kafka (with bootstrap_servers: HOST:PORT).",
    )


CONFIG_MODELS: dict[ConfigKind, type[Tier1Config] | type[Tier2Config]] = {"tier1": Tier1Config, "tier2": Tier2Config}
