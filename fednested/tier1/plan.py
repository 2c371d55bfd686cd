"""What a core update will do, decided and checked once before any rank starts: the DeepSpeed config, the
datasets (with sha256), the champion and the edge aggregates. The plan travels to the ranks as one JSON file.

Everything that can be refused without training is refused here, so a bad config costs milliseconds, not a
launch of N processes that each fail the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from fednested.config.models import Tier1TrainingSettings
from fednested.data.jsonl import read_jsonl

Accelerator = Literal["cpu", "cuda"]
# Keys the core update sets from the tier1 config; an extra DeepSpeed JSON may not set them differently.
_OWNED_SECTIONS = ("optimizer", "scheduler")
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


class CorePlanError(ValueError):
    """A core update that cannot run as configured; says which setting or file and what to do."""


@dataclass(frozen=True)
class DatasetEntry:
    """One Tier-1 JSONL file as it was checked: its sha256 and what reading it found."""

    path: str
    sha256: str
    bytes: int
    records: int
    bad_lines: int
    first_bad_lines: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FaultPlan:
    """`core_update.fault_injection`: rank `rank` raises after `after_step` optimizer steps."""

    rank: int
    after_step: int


@dataclass(frozen=True)
class CoreUpdatePlan:
    """Everything a rank needs, resolved to absolute paths and plain values (written as plan.json)."""

    champion_dir: str
    champion_version: str
    version_id: str
    version_dir: str
    run_dir: str
    datasets: list[DatasetEntry]
    deepspeed_config: dict[str, Any]
    accelerator: Accelerator
    backend: str
    world_size: int
    precision: Literal["fp32", "bf16"]
    seq_len: int
    max_steps: int
    learning_rate: float
    weight_decay: float
    warmup_steps: int
    seed: int
    train_gate: bool
    eta_core: float
    eta_t1: float
    eta_t2: float
    cpu_shm_comm: bool
    edge_base: str | None = None
    edge_aggregates: list[dict[str, Any]] = field(default_factory=list)
    fault: FaultPlan | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CoreUpdatePlan:
        data = json.loads(text)
        data["datasets"] = [DatasetEntry(**entry) for entry in data["datasets"]]
        data["fault"] = FaultPlan(**data["fault"]) if data.get("fault") else None
        return cls(**data)


def file_sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def inspect_dataset(path: Path) -> DatasetEntry:
    """Hash and read one JSONL file: a missing file or one with no valid record at all is an error; malformed lines
    in an otherwise valid file are counted and reported, and the run goes on without them."""
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise CorePlanError(f"dataset {path} {what}; fix training.train_files in the tier1 config")
    try:
        sha256, size = file_sha256(path)
        result = read_jsonl(path)
    except OSError as error:
        raise CorePlanError(f"dataset {path} cannot be read: {error.strerror}") from error
    if not result.records:
        detail = f"; first problem: {result.bad_lines[0]}" if result.bad_lines else " (it is empty)"
        raise CorePlanError(
            f"dataset {path} is corrupt: no valid record in {result.lines_read} line(s), "
            f"{result.skipped} malformed{detail}"
        )
    return DatasetEntry(
        path=str(path),
        sha256=sha256,
        bytes=size,
        records=len(result.records),
        bad_lines=result.skipped,
        first_bad_lines=[str(bad) for bad in result.bad_lines[:5]],
    )


def resolve_precision(precision: str, accelerator: Accelerator, *, bf16_supported: bool) -> Literal["fp32", "bf16"]:
    """auto: bf16 on a CUDA device that supports it, fp32 on CPU (the edge loop's rule, fednested.training.forward)."""
    if precision == "fp32":
        return "fp32"
    if precision == "bf16":
        if accelerator == "cuda" and not bf16_supported:
            raise CorePlanError("training.precision is bf16 but this GPU has no bf16 support; use fp32 or auto")
        return "bf16"
    return "bf16" if accelerator == "cuda" and bf16_supported else "fp32"


def _load_extra(path: Path) -> dict[str, Any]:
    try:
        extra = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorePlanError(f"training.deepspeed_config {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorePlanError(f"training.deepspeed_config {path} is not valid JSON: {error}") from error
    if not isinstance(extra, dict):
        raise CorePlanError(f"training.deepspeed_config {path} must hold a JSON object")
    return extra


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_deepspeed_config(
    training: Tier1TrainingSettings, *, accelerator: Accelerator, precision: Literal["fp32", "bf16"]
) -> dict[str, Any]:
    """The DeepSpeed config of a core update: built from the tier1 training settings, the optional extra JSON merged
    over it, then checked; every way it cannot work raises CorePlanError naming the key."""
    world = training.ranks
    zero: dict[str, Any] = {"stage": training.zero_stage}
    if training.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": training.rows_per_batch,
        "gradient_accumulation_steps": training.grad_accum_steps,
        "train_batch_size": training.rows_per_batch * training.grad_accum_steps * world,
        "gradient_clipping": training.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # The optimizer is torch's AdamW passed in by the core update; DeepSpeed tests ZeRO with its own ones only.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": max(training.max_steps, 1),
        "wall_clock_breakdown": False,
    }
    if training.offload_optimizer:
        # ZeRO-Offload steps the optimizer on the host with DeepSpeedCPUAdam, which DeepSpeed builds from this section.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": training.learning_rate, "weight_decay": training.weight_decay},
        }
    if training.deepspeed_config is not None:
        extra = _load_extra(training.deepspeed_config)
        for key in _OWNED_SECTIONS:
            if key in extra:
                raise CorePlanError(
                    f"training.deepspeed_config sets {key!r}; the core update sets the optimizer and its schedule from "
                    "training.learning_rate, weight_decay and warmup_steps: remove the key"
                )
        config = _merge(config, extra)
    check_deepspeed_config(config, world_size=world, accelerator=accelerator)
    return config


def check_deepspeed_config(config: dict[str, Any], *, world_size: int, accelerator: Accelerator) -> None:
    """Refuse, before training, a DeepSpeed config that cannot work for a core update on `accelerator`."""
    values: dict[str, int] = {}
    for key in _BATCH_KEYS:
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CorePlanError(f"DeepSpeed config: {key} must be a positive integer, got {value!r}")
        values[key] = value
    expected = values["train_micro_batch_size_per_gpu"] * values["gradient_accumulation_steps"] * world_size
    if values["train_batch_size"] != expected:
        raise CorePlanError(
            f"DeepSpeed config: train_batch_size {values['train_batch_size']} != train_micro_batch_size_per_gpu "
            f"{values['train_micro_batch_size_per_gpu']} x gradient_accumulation_steps "
            f"{values['gradient_accumulation_steps']} x {world_size} ranks = {expected}; fix the batch sizes"
        )
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise CorePlanError("DeepSpeed config: zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2):
        raise CorePlanError(
            f"DeepSpeed config: ZeRO stage {stage!r} is not supported by the core update, which reads whole weights "
            "on rank 0 to build the candidate (stage 3 partitions them); use stage 0, 1 or 2"
        )
    offload = zero.get("offload_optimizer") or zero.get("offload_param")
    if offload and accelerator != "cuda":
        raise CorePlanError(
            "DeepSpeed config: optimizer/parameter offload needs a CUDA accelerator; on the CPU accelerator the "
            "optimizer state is already in host memory: set training.offload_optimizer to false"
        )
    if offload and stage == 0:
        raise CorePlanError("DeepSpeed config: offload needs ZeRO stage 1 or 2; set training.zero_stage")
    fp16 = config.get("fp16", {})
    if isinstance(fp16, dict) and fp16.get("enabled") and accelerator == "cpu":
        raise CorePlanError("DeepSpeed config: fp16 is not supported on the CPU accelerator; use bf16 or fp32")
    bf16 = config.get("bf16", {})
    if isinstance(fp16, dict) and isinstance(bf16, dict) and fp16.get("enabled") and bf16.get("enabled"):
        raise CorePlanError("DeepSpeed config: fp16 and bf16 are both enabled; choose one")
