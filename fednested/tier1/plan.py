"""What a core update will do, decided and checked once before any rank starts: the DeepSpeed config, the
datasets (with sha256), the champion, the edge aggregates and the anti-forgetting safeguards. The plan travels to
the ranks as one JSON file.

Everything that can be refused without training is refused here, so a bad config costs milliseconds, not a
launch of N processes that each fail the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import PretrainedConfig

from fednested.adapters.lora import expert_stacks, layer_index
from fednested.checkpoints.manifest import Manifest
from fednested.checkpoints.safeguards import MAX_REPLAY_BYTES, REPLAY_FILE_NAME
from fednested.checkpoints.versions import build_empty_model
from fednested.config.adapter import EXPERT_TARGETS, AdapterError
from fednested.config.models import Tier1TrainingSettings
from fednested.config.training import SafeguardConfig
from fednested.data.jsonl import JsonlFormatError, read_jsonl
from fednested.partition import partition_model
from fednested.training.safeguards import FISHER_FILE_NAME, FisherFileError, load_fisher_file

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
class SafeguardPlan:
    """`core_update.safeguards` checked against the champion and resolved to tensor names (plan.json's
    `safeguards`): EWC's Fisher file, the tensors frozen whole, and the [tensor, expert] slices frozen in fused ones."""

    config: dict[str, Any]
    ewc_lambda: float
    fisher_path: str | None = None
    fisher_sha256: str | None = None
    replay_path: str | None = None
    replay_sha256: str | None = None
    replay_fraction: float = 0.0
    distill_weight: float = 0.0
    distill_temperature: float = 2.0
    frozen_tensors: list[str] = field(default_factory=list)
    frozen_slices: list[tuple[str, int]] = field(default_factory=list)


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
    safeguards: SafeguardPlan | None = None
    # The candidate's parent: the champion (None), or the last edge aggregate folded in (launcher.prepare_plan).
    parent_version: str | None = None
    # The artifact store's root (its absolute and resolved spellings) when the control plane runs the update: the
    # candidate's lineage then names files as `artifacts://<path in the store>`, never by the server's absolute path
    # (a manifest travels to devices, MLflow and DataHub). Empty for the CLI: its lineage keeps the paths it was given.
    lineage_roots: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CoreUpdatePlan:
        data = json.loads(text)
        data["datasets"] = [DatasetEntry(**entry) for entry in data["datasets"]]
        data["fault"] = FaultPlan(**data["fault"]) if data.get("fault") else None
        if data.get("safeguards"):
            guards = data["safeguards"]
            guards["frozen_slices"] = [(str(name), int(expert)) for name, expert in guards["frozen_slices"]]
            data["safeguards"] = SafeguardPlan(**guards)
        return cls(**data)


# How a file of the artifact store is named outside the server (the control plane's registry rows write the same
# form, apps/registry/storage.py): its path relative to the store's root, so no server path leaves the server.
STORE_URI_PREFIX = "artifacts://"


def store_roots(root: Path) -> list[str]:
    """The spellings of the store's root a path may start with (as given and with symlinks resolved), longest first."""
    return sorted({str(root.absolute()), str(root.resolve())} - {"/"}, key=len, reverse=True)


def store_references(value: Any, roots: list[str]) -> Any:
    """`value` (a lineage: dicts, lists, strings, numbers) with each string naming a file inside one of `roots` written
    `artifacts://<path in the store>`; other values as they are."""
    if isinstance(value, dict):
        return {key: store_references(item, roots) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [store_references(item, roots) for item in value]
    if isinstance(value, str):
        for root in roots:
            if value == root or value.startswith(root + "/"):
                return STORE_URI_PREFIX + value[len(root) :].lstrip("/")
    return value


def absolute_paths(value: Any) -> list[str]:
    """Every string in `value` that is an absolute filesystem path (what a lineage must not carry off the server)."""
    if isinstance(value, dict):
        return [path for item in value.values() for path in absolute_paths(item)]
    if isinstance(value, (list, tuple)):
        return [path for item in value for path in absolute_paths(item)]
    return [value] if isinstance(value, str) and value.startswith("/") else []


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


def plan_safeguards(
    safeguards: SafeguardConfig,
    *,
    champion_dir: Path,
    manifest: Manifest,
    model_config: PretrainedConfig,
    train_gate: bool,
) -> SafeguardPlan | None:
    """Check `core_update.safeguards` against the champion before any rank starts; None when all are off.

    EWC needs the champion's own Fisher (listed in its manifest, so sha256-verified, estimated for this version, with
    this architecture's shapes); replay and distillation need the champion's replay set (listed, bounded, every line a
    record); a layer or expert to freeze must exist. A safeguard asked for is never silently skipped.
    """
    if not safeguards.any_enabled:
        return None
    replay_path, replay_sha256 = None, None
    if safeguards.replay_fraction > 0 or safeguards.distill_weight > 0:
        replay_path, replay_sha256 = _check_replay(safeguards, champion_dir, manifest)
    # Shapes and names only: the empty model's storage is never written, so it costs no memory.
    model = build_empty_model(model_config)
    fisher_path: Path | None = None
    fisher_sha256: str | None = None
    if safeguards.ewc_lambda > 0:
        entry = manifest.files.get(FISHER_FILE_NAME)
        if entry is None or entry.partition != "safeguards":
            raise CorePlanError(
                f"core_update.safeguards.ewc_lambda is {safeguards.ewc_lambda} but the champion "
                f"{manifest.version_id!r} ({champion_dir}) ships no {FISHER_FILE_NAME}: create the champion with a "
                "Fisher (FEDNESTED_FISHER) or set ewc_lambda to 0"
            )
        fisher_path = champion_dir / FISHER_FILE_NAME
        try:
            load_fisher_file(fisher_path, expected_version=manifest.version_id, model=model)
        except FisherFileError as error:
            raise CorePlanError(
                f"core_update.safeguards.ewc_lambda: the champion's Fisher is unusable: {error}"
            ) from error
        fisher_sha256 = entry.sha256
    parameters = dict(model.named_parameters())
    stacks = expert_stacks(model)
    experts_per_layer = {layer_index(name): parameters[f"{name}.{EXPERT_TARGETS[0]}"].shape[0] for name in stacks}
    decoder_layers = sorted({layer for name in parameters if (layer := _decoder_layer(name)) is not None})
    for layer in safeguards.freeze_layers:
        if layer not in decoder_layers:
            raise CorePlanError(
                f"core_update.safeguards.freeze_layers names layer {layer}; the champion has decoder layers "
                f"{decoder_layers[0]}..{decoder_layers[-1]}"
            )
    for layer, expert in sorted(safeguards.frozen_experts):
        if layer not in experts_per_layer or expert >= experts_per_layer[layer]:
            raise CorePlanError(
                f"core_update.safeguards.freeze_experts names '{layer}:{expert}'; the champion's MoE layers are "
                f"{sorted(experts_per_layer)} with {max(experts_per_layer.values(), default=0)} experts each"
            )
    partition = partition_model(model)
    frozen_tensors = sorted(
        name
        for name in parameters
        if (safeguards.freeze_gate and partition.kind_of_file(name) == "gate")
        or _decoder_layer(name) in safeguards.freeze_layers
    )
    frozen_slices = sorted(
        (f"{stack}.{target}", expert)
        for stack in stacks
        for target in EXPERT_TARGETS
        for layer, expert in safeguards.frozen_experts
        if layer == layer_index(stack) and layer not in safeguards.freeze_layers
    )
    trainable = [
        name
        for name in parameters
        if name not in frozen_tensors and (train_gate or partition.kind_of_file(name) != "gate")
    ]
    if not trainable:
        raise CorePlanError("core_update.safeguards freezes every tensor the core update would train; nothing to do")
    return SafeguardPlan(
        # as it reads back from plan.json (tuples become lists), so a plan equals its round trip
        config=json.loads(json.dumps(asdict(safeguards))),
        ewc_lambda=safeguards.ewc_lambda,
        fisher_path=str(fisher_path.resolve()) if fisher_path is not None else None,
        fisher_sha256=fisher_sha256,
        replay_path=str(replay_path.resolve()) if replay_path is not None else None,
        replay_sha256=replay_sha256,
        replay_fraction=safeguards.replay_fraction,
        distill_weight=safeguards.distill_weight,
        distill_temperature=safeguards.distill_temperature,
        frozen_tensors=frozen_tensors,
        frozen_slices=frozen_slices,
    )


def _check_replay(safeguards: SafeguardConfig, champion_dir: Path, manifest: Manifest) -> tuple[Path, str]:
    """The champion's replay set (path, sha256) for replay and distillation, checked as the edge checks it: listed in
    the manifest, at most MAX_REPLAY_BYTES, every line a valid record, at least one."""
    asked = (
        f"replay_fraction is {safeguards.replay_fraction}"
        if safeguards.replay_fraction > 0
        else f"distill_weight is {safeguards.distill_weight}"
    )
    entry = manifest.files.get(REPLAY_FILE_NAME)
    path = champion_dir / REPLAY_FILE_NAME
    if entry is None or entry.partition != "safeguards":
        raise CorePlanError(
            f"core_update.safeguards.{asked} but the champion {manifest.version_id!r} ({champion_dir}) ships no "
            f"{REPLAY_FILE_NAME}: create the champion with a replay set (FEDNESTED_REPLAY_SET) or turn it off"
        )
    if entry.bytes > MAX_REPLAY_BYTES:
        raise CorePlanError(f"{path}: {entry.bytes} bytes, over the {MAX_REPLAY_BYTES} a replay set may have")
    try:
        records = read_jsonl(path, strict=True).records
    except (JsonlFormatError, OSError) as error:
        raise CorePlanError(
            f"core_update.safeguards.{asked} but the champion's replay set is unusable: {error}"
        ) from None
    if not records:
        raise CorePlanError(f"core_update.safeguards.{asked} but the champion's replay set {path} holds no record")
    return path, entry.sha256


def _decoder_layer(name: str) -> int | None:
    """The decoder layer a parameter belongs to; None for the embeddings, final norm and head."""
    try:
        return layer_index(name)
    except AdapterError:
        return None
