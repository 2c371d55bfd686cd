"""Run a core update end to end: check the plan, launch the ranks with torchrun, and move the candidate into place.

Everything is written inside a hidden staging directory next to the output; only when the launcher exited 0 and
the candidate verifies is it renamed to <output_dir>/<version id>. On any failure the staging directory is removed
and CoreUpdateError carries the failing rank's log tail, so nothing half-written ever looks like a version.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fednested.checkpoints.errors import CheckpointError
from fednested.checkpoints.versions import open_version, verify_version
from fednested.config.models import Tier1Config
from fednested.governance.ranger import PolicyFileError
from fednested.tier1.access import DatasetAccessDenied, decide_dataset_access, principal_of, require_allowed
from fednested.tier1.combine import check_edge_chain
from fednested.tier1.core_update import RESULT_NAME, rank_failure_path, rank_log_path
from fednested.tier1.plan import (
    Accelerator,
    CorePlanError,
    CoreUpdatePlan,
    FaultPlan,
    absolute_paths,
    build_deepspeed_config,
    inspect_dataset,
    plan_safeguards,
    resolve_precision,
    store_references,
    store_roots,
)

LOG_TAIL_LINES = 40
PLAN_NAME = "plan.json"
LAUNCHER_LOG_NAME = "launcher.log"


class CoreUpdateError(RuntimeError):
    """A core update that was refused or failed; `log_tail` holds the failing rank's last log lines, if any ran."""

    def __init__(self, message: str, *, log_tail: str = "") -> None:
        self.log_tail = log_tail
        super().__init__(f"{message}\n{log_tail}" if log_tail else message)


@dataclass(frozen=True)
class CoreUpdateResult:
    """A finished core update: the candidate version directory, its lineage, and the run's directory (rank logs,
    plan, trained delta, metrics)."""

    version_id: str
    version_dir: Path
    lineage: dict[str, Any]
    run_dir: Path
    metrics: dict[str, Any]


def _accelerator(requested: str) -> tuple[Accelerator, str, bool]:
    import torch

    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise CorePlanError("core_update.accelerator is cuda but no CUDA device is visible; use auto or cpu")
    accelerator: Accelerator = "cuda" if requested == "cuda" or (requested == "auto" and cuda) else "cpu"
    bf16 = accelerator == "cuda" and torch.cuda.is_bf16_supported()
    return accelerator, ("nccl" if accelerator == "cuda" else "gloo"), bf16


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _failure_report(run_dir: Path, world_size: int, returncode: int) -> CoreUpdateError:
    """The rank that failed first (by its .failed marker), with its log tail; else every rank's, then torchrun's."""
    failed = sorted(
        (path.stat().st_mtime, rank)
        for rank in range(world_size)
        if (path := rank_failure_path(run_dir, rank)).exists()
    )
    if failed:
        rank = failed[0][1]
        reason = rank_failure_path(run_dir, rank).read_text(encoding="utf-8").strip()
        tail = _tail(rank_log_path(run_dir, rank))
        return CoreUpdateError(
            f"core update failed: rank {rank} crashed ({reason}); launcher exit status {returncode}",
            log_tail=f"--- rank {rank} log, last {LOG_TAIL_LINES} lines ---\n{tail}",
        )
    tails = [f"--- launcher log ---\n{_tail(run_dir / LAUNCHER_LOG_NAME)}"]
    tails += [f"--- rank {rank} log ---\n{_tail(rank_log_path(run_dir, rank))}" for rank in range(world_size)]
    return CoreUpdateError(
        f"core update failed: the launcher exited with status {returncode} and no rank recorded an error",
        log_tail="\n".join(tails),
    )


def prepare_plan(
    config: Tier1Config,
    *,
    staging: Path,
    version_id: str,
    edge_base: Path | None,
    edge_aggregates: Sequence[Path],
    parent_version: str | None = None,
    lineage_store: Path | None = None,
) -> CoreUpdatePlan:
    """Check every input of a core update (without launching anything) and resolve it into a plan.

    `parent_version` (default: the champion's) may name the last edge aggregate instead: the control plane trains the
    last core update's version and folds in the aggregates promoted since, and the candidate must descend from the
    champion of the day (the newest of them) for the registry's line of promotions.

    `lineage_store` (the control plane's artifact store) makes the candidate's lineage name every file it read as
    `artifacts://<path in the store>`; a file outside the store is then refused here, before anything runs, since
    its path could only be recorded as the server's."""
    settings, training = config.core_update, config.training
    if settings.champion_dir is None:
        raise CorePlanError("core_update.champion_dir is not set: name the champion's version directory")
    try:
        manifest, model_config = open_version(settings.champion_dir)
    except CheckpointError as error:
        raise CorePlanError(f"champion: {error}") from error
    if not training.train_files:
        raise CorePlanError("training.train_files is empty: list the Tier-1 JSONL datasets to train on")
    if settings.dataset_policies is not None:
        # Decided on the paths alone: nothing of a dataset is opened before every one of them is allowed.
        try:
            decisions = decide_dataset_access(
                settings.dataset_policies,
                principal_of(settings),
                [Path(path) for path in training.train_files],
                store_root=Path(config.storage.artifact_root),
            )
            require_allowed(decisions)
        except (PolicyFileError, DatasetAccessDenied) as error:
            raise CorePlanError(f"core_update.dataset_policies: {error}") from error
    datasets = [inspect_dataset(Path(path)) for path in training.train_files]
    accelerator, backend, bf16_supported = _accelerator(settings.accelerator)
    precision = resolve_precision(training.precision, accelerator, bf16_supported=bf16_supported)
    deepspeed_config = build_deepspeed_config(training, accelerator=accelerator, precision=precision)
    if edge_aggregates and edge_base is None:
        raise CorePlanError("edge aggregates were given without the edge base (the last core update's version)")
    aggregates: list[dict[str, Any]] = []
    if edge_base is not None:
        try:
            _, aggregates = check_edge_chain(edge_base, edge_aggregates, architecture_id=manifest.architecture_id)
        except CheckpointError as error:
            raise CorePlanError(f"edge aggregates: {error}") from error
    safeguards = plan_safeguards(
        settings.safeguards,
        champion_dir=Path(settings.champion_dir),
        manifest=manifest,
        model_config=model_config,
        train_gate=training.train_gate,
    )
    newest = aggregates[-1]["version_id"] if aggregates else manifest.version_id
    if parent_version is not None and parent_version not in (manifest.version_id, newest):
        raise CorePlanError(
            f"the candidate's parent {parent_version!r} must be the champion {manifest.version_id!r} or the last edge "
            f"aggregate folded in ({newest!r})"
        )
    fault = settings.fault_injection
    if fault is not None and fault.rank >= training.ranks:
        raise CorePlanError(f"core_update.fault_injection.rank {fault.rank} does not exist ({training.ranks} ranks)")
    roots = store_roots(lineage_store) if lineage_store is not None else []
    if roots:
        read = [str(Path(settings.champion_dir).resolve()), *(entry.path for entry in datasets)]
        read += [str(edge_base.resolve())] if edge_base is not None else []
        read += [str(aggregate["path"]) for aggregate in aggregates]
        read += absolute_paths(asdict(safeguards)) if safeguards is not None else []
        outside = absolute_paths(store_references(read, roots))
        if outside:
            raise CorePlanError(
                f"{', '.join(outside)} lie(s) outside the artifact store {lineage_store}: the candidate's lineage "
                "can only name files of the store; copy them into it"
            )
    return CoreUpdatePlan(
        champion_dir=str(Path(settings.champion_dir).resolve()),
        champion_version=manifest.version_id,
        parent_version=parent_version,
        version_id=version_id,
        version_dir=str(staging / "version"),
        run_dir=str(staging / "run"),
        datasets=datasets,
        deepspeed_config=deepspeed_config,
        accelerator=accelerator,
        backend=backend,
        world_size=training.ranks,
        precision=precision,
        seq_len=training.seq_len,
        max_steps=training.max_steps,
        learning_rate=training.learning_rate,
        weight_decay=training.weight_decay,
        warmup_steps=training.warmup_steps,
        seed=training.seed,
        train_gate=training.train_gate,
        eta_core=settings.eta_core,
        eta_t1=settings.eta_t1,
        eta_t2=settings.eta_t2,
        cpu_shm_comm=settings.cpu_shm_comm,
        edge_base=str(edge_base.resolve()) if edge_base is not None else None,
        edge_aggregates=aggregates,
        fault=FaultPlan(fault.rank, fault.after_step) if fault is not None else None,
        safeguards=safeguards,
        lineage_roots=roots,
    )


def run_core_update(
    config: Tier1Config,
    *,
    edge_base: Path | None = None,
    edge_aggregates: Sequence[Path] = (),
    version_id: str | None = None,
    parent_version: str | None = None,
    lineage_store: Path | None = None,
) -> CoreUpdateResult:
    """Train the champion under DeepSpeed with `config.training.ranks` ranks and write the candidate version.

    `edge_base` is the version of the last core update and `edge_aggregates` the edge-aggregate versions applied
    since, oldest first; their expert deltas are folded in as dW_edges; `parent_version` is the candidate's parent
    (the champion's by default, or the last of those aggregates: `prepare_plan`); `lineage_store`, the artifact
    store whose files the lineage names store-relative (the control plane's job; `prepare_plan`). Raises
    CoreUpdateError for a refused plan (before anything starts) or a failed run (with the failing rank's log tail);
    nothing is left in the output.
    """
    settings = config.core_update
    vid = version_id or f"core-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    output_dir = Path(settings.output_dir)
    final_dir = output_dir / vid
    if final_dir.exists():
        raise CoreUpdateError(f"{final_dir} exists already: versions are immutable, choose another version id")
    run_root = Path(config.storage.checkpoint_dir) / "core-updates"
    if (run_root / vid).exists():
        raise CoreUpdateError(f"run directory {run_root / vid} exists already; choose another version id")
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{vid}.", dir=output_dir))
    try:
        try:
            plan = prepare_plan(
                config,
                staging=staging,
                version_id=vid,
                edge_base=edge_base,
                edge_aggregates=edge_aggregates,
                parent_version=parent_version,
                lineage_store=lineage_store,
            )
        except CorePlanError as error:
            raise CoreUpdateError(f"core update refused before training: {error}") from error
        run_dir = Path(plan.run_dir)
        run_dir.mkdir()
        plan_path = run_dir / PLAN_NAME
        plan_path.write_text(plan.to_json(), encoding="utf-8")
        _launch(plan, plan_path, timeout_s=settings.timeout_s, master_port=settings.master_port)
        try:
            manifest = verify_version(plan.version_dir)
        except CheckpointError as error:
            raise CoreUpdateError(f"core update wrote no valid candidate: {error}") from error
        metrics = json.loads((run_dir / RESULT_NAME).read_text(encoding="utf-8"))["metrics"]
        run_root.mkdir(parents=True, exist_ok=True)
        final_run = run_root / vid
        shutil.move(str(run_dir), str(final_run))
        # the rename is the commit point: before it there is no version, after it a complete one
        os.replace(plan.version_dir, final_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return CoreUpdateResult(
        version_id=vid, version_dir=final_dir, lineage=manifest.lineage, run_dir=final_run, metrics=metrics
    )


def _launch(plan: CoreUpdatePlan, plan_path: Path, *, timeout_s: float, master_port: int) -> None:
    run_dir = Path(plan.run_dir)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(plan.world_size),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(master_port or _free_port()),
        "--max_restarts",
        "0",
        "-m",
        "fednested.tier1.core_update",
        str(plan_path),
    ]
    env = dict(os.environ, DS_ACCELERATOR=plan.accelerator)
    # the ranks import this package from wherever the launcher found it, installed or not
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    # One thread per rank unless the operator chose otherwise: N ranks of all-core OpenMP pools oversubscribe.
    env.setdefault("OMP_NUM_THREADS", "1")
    with open(run_dir / LAUNCHER_LOG_NAME, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise CoreUpdateError(
                f"core update timed out after {timeout_s:.0f} s (core_update.timeout_s); the ranks were killed",
                log_tail=f"--- rank 0 log ---\n{_tail(rank_log_path(run_dir, 0))}",
            ) from None
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
    if returncode != 0:
        raise _failure_report(run_dir, plan.world_size, returncode)
