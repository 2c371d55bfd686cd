"""One rank of a core update (`python -m fednested.tier1.core_update PLAN.json`, started by torchrun): train the
champion's core and experts (and gates when configured) under DeepSpeed, then on rank 0 fold the deltas into a
candidate version written inside the run's staging directory. The launcher moves it into place.

With ZeRO stage 0-2 every rank holds the whole weights after each step (only optimizer state and gradients are
partitioned), so rank 0 reads the trained weights straight from its model.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import distributed as dist

from fednested.checkpoints.versions import load_version, save_version
from fednested.data.encoding import EncodedExample, encode_records
from fednested.data.jsonl import read_jsonl
from fednested.data.packing import PackedBatch, iter_batches, pack_examples
from fednested.data.tokenizer import load_tokenizer
from fednested.partition import PartitionKind, partition_model
from fednested.tier1.combine import CoreUpdateEtas, combine_core_update, edge_expert_delta
from fednested.tier1.plan import CoreUpdatePlan, absolute_paths, file_sha256, store_references
from fednested.tier1.safeguards import (
    CoreSafeguards,
    champion_snapshots,
    distillation_batches,
    mix_in_replay,
    replay_examples,
)
from fednested.training.forward import packed_loss_sum

RESULT_NAME = "result.json"
TRAINED_DELTA_NAME = "trained_delta.safetensors"


class InjectedFault(RuntimeError):
    """Raised by the rank named in core_update.fault_injection (a rehearsal of a crashing rank)."""


def rank_log_path(run_dir: Path, rank: int) -> Path:
    return run_dir / f"rank-{rank}.log"


def rank_failure_path(run_dir: Path, rank: int) -> Path:
    return run_dir / f"rank-{rank}.failed"


def _read_examples(plan: CoreUpdatePlan, tokenizer: Any) -> list[EncodedExample]:
    """Every dataset, re-hashed and checked against the plan: a file changed since the launcher checked it is refused
    rather than trained on under the wrong sha256 in the lineage."""
    records = []
    for entry in plan.datasets:
        sha256, _ = file_sha256(Path(entry.path))
        if sha256 != entry.sha256:
            raise RuntimeError(f"dataset {entry.path} changed after the launcher checked it (sha256 {sha256[:12]})")
        records.extend(read_jsonl(entry.path).records)
    return encode_records(records, tokenizer)


def _rank_windows(
    examples: list[EncodedExample], plan: CoreUpdatePlan, rank: int, pad_id: int, epoch: int
) -> list[list[PackedBatch]]:
    """This rank's optimizer steps of one epoch: the same shuffled, packed batches on every rank (one seed), dealt
    round-robin, and cut to a whole number of steps so every rank takes the same number of steps."""
    micro = int(plan.deepspeed_config["train_micro_batch_size_per_gpu"])
    accum = int(plan.deepspeed_config["gradient_accumulation_steps"])
    order = list(range(len(examples)))
    random.Random(plan.seed * 1_000_003 + epoch).shuffle(order)
    rows = pack_examples([examples[index] for index in order], plan.seq_len, pad_id=pad_id)
    batches = list(iter_batches(rows, micro))
    steps = len(batches) // (plan.world_size * accum)
    if steps == 0:
        raise RuntimeError(
            f"the datasets pack into {len(batches)} micro-batch(es) of {micro} rows x {plan.seq_len} tokens, fewer "
            f"than one optimizer step needs ({plan.world_size} ranks x {accum} accumulation steps): add data or lower "
            "training.rows_per_batch / seq_len / grad_accum_steps / ranks"
        )
    mine = batches[rank :: plan.world_size][: steps * accum]
    return [mine[start : start + accum] for start in range(0, len(mine), accum)]


def _warmup(plan: CoreUpdatePlan) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]:
    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        warmup = plan.warmup_steps
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        )

    return build


def train_rank(plan: CoreUpdatePlan, rank: int) -> dict[str, Any]:
    """Train on this rank; on rank 0 also write the candidate version and the run's result. Returns the metrics."""
    import deepspeed  # only ranks pay for importing DeepSpeed

    if plan.accelerator == "cpu" and not plan.cpu_shm_comm:
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        # The shared-memory all-reduce is a C++ op compiled on first use (minutes on a small machine); without it
        # DeepSpeed's CPU accelerator uses plain gloo collectives.
        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    deepspeed.init_distributed(dist_backend=plan.backend)
    torch.manual_seed(plan.seed)
    run_dir = Path(plan.run_dir)
    model, manifest = load_version(plan.champion_dir, expected_version=plan.champion_version)
    tokenizer = load_tokenizer(plan.champion_dir)
    pad_id = tokenizer.pad_token_id if isinstance(tokenizer.pad_token_id, int) else tokenizer.eos_token_id
    if not isinstance(pad_id, int):
        raise RuntimeError(f"the champion's tokenizer in {plan.champion_dir} has neither a pad nor an eos token")
    examples = _read_examples(plan, tokenizer)
    guard_plan = plan.safeguards
    replay = replay_examples(guard_plan, tokenizer) if guard_plan is not None else []
    replay_mixed = 0
    if guard_plan is not None and guard_plan.replay_fraction > 0:
        mixed = mix_in_replay(guard_plan, examples, replay, plan.seed)
        replay_mixed = len(mixed) - len(examples)
        examples = mixed

    partition = partition_model(model)
    kinds: dict[str, PartitionKind] = {name: partition.kind_of_file(name) for name in partition}
    frozen = set(plan.safeguards.frozen_tensors) if plan.safeguards is not None else set()
    for name, parameter in model.named_parameters():
        # a tensor frozen whole never reaches the optimizer, so nothing (not even weight decay) can move it
        parameter.requires_grad_((plan.train_gate or kinds[name] != "gate") and name not in frozen)
    snapshots = champion_snapshots(model, plan.safeguards) if plan.safeguards is not None else {}
    teacher: torch.nn.Module | None = None
    if guard_plan is not None and guard_plan.distill_weight > 0:
        # the champion as it was, frozen: a second copy of the weights on this rank's device
        teacher = load_version(plan.champion_dir, expected_version=plan.champion_version)[0]
        teacher.requires_grad_(False)
    # rank 0 keeps the champion's weights to take the delta against (the model's own storage is trained in place)
    champion = {name: p.detach().clone() for name, p in model.named_parameters()} if rank == 0 else {}
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if "optimizer" not in plan.deepspeed_config:
        optimizer = torch.optim.AdamW(trainable, lr=plan.learning_rate, weight_decay=plan.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=trainable,
        lr_scheduler=_warmup(plan),
        config=plan.deepspeed_config,
    )
    device = engine.device
    guards = None
    if guard_plan is not None:
        if teacher is not None:
            # the teacher in the student's dtype: DeepSpeed's bf16 mode holds bf16 weights
            teacher.to(device=device, dtype=next(engine.module.parameters()).dtype)
        guards = CoreSafeguards.build(
            guard_plan,
            engine.module,
            snapshots,
            champion_version=plan.champion_version,
            device=device,
            teacher=teacher,
            distill=distillation_batches(
                replay,
                seq_len=plan.seq_len,
                rows=int(plan.deepspeed_config["train_micro_batch_size_per_gpu"]),
                pad_id=pad_id,
                rank=rank,
                world_size=plan.world_size,
            )
            if teacher is not None
            else None,
            replay_mixed=replay_mixed,
        )
    snapshots.clear()
    # DeepSpeed's bf16 mode holds bf16 weights with fp32 master copies, so the forward needs no autocast.
    # per step: this rank's loss sum and target count; summed over ranks once at the end, so logging the loss
    # adds no collective (and no synchronisation point) to the step
    local_losses: list[tuple[float, float]] = []
    tokens = 0
    started = time.perf_counter()
    epoch = 0
    while len(local_losses) < plan.max_steps:
        for window in _rank_windows(examples, plan, rank, pad_id, epoch):
            loss_total, target_total = 0.0, 0
            for micro, batch in enumerate(window):
                on_device = batch.to(device)
                loss_sum, count = packed_loss_sum(engine.module, on_device, precision="fp32")
                # the mean over this micro-batch's targets; DeepSpeed divides by the accumulation steps
                loss = loss_sum / max(count, 1)
                if micro == 0 and guards is not None:
                    # the EWC and distillation terms once per optimizer step (the weights do not move within a
                    # window), scaled up by the accumulation steps DeepSpeed divides every micro-batch's loss by
                    for term in (guards.penalty(), guards.distillation(engine.module, device)):
                        if term is not None:
                            loss = loss + term * len(window)
                engine.backward(loss)
                stepping = engine.is_gradient_accumulation_boundary()
                engine.step()
                if stepping and guards is not None:
                    guards.restore()
                loss_total += float(loss_sum.detach())
                target_total += count
                tokens += batch.real_tokens
            local_losses.append((loss_total, float(target_total)))
            fault = plan.fault
            if fault is not None and fault.rank == rank and len(local_losses) >= fault.after_step:
                raise InjectedFault(
                    f"core_update.fault_injection: rank {rank} raises after step {len(local_losses)} as configured"
                )
            if len(local_losses) >= plan.max_steps:
                break
        epoch += 1
    duration = time.perf_counter() - started
    all_tokens = torch.tensor([float(tokens)], dtype=torch.float64)
    dist.all_reduce(all_tokens)
    step_losses = torch.tensor(local_losses, dtype=torch.float64)
    dist.all_reduce(step_losses)
    losses = [float(total) / max(float(count), 1.0) for total, count in step_losses.tolist()]
    metrics: dict[str, Any] = {
        "steps": len(losses),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_curve": losses,
        "tokens": int(all_tokens.item()),
        "train_seconds": duration,
        "tokens_per_s": all_tokens.item() / duration if duration > 0 else 0.0,
        "ewc_penalty_last": guards.last_penalty if guards is not None else None,
        "distill_loss_last": guards.last_distill if guards is not None else None,
        "replay_records": replay_mixed,
    }
    if not all(math.isfinite(loss) for loss in losses):
        raise RuntimeError(f"training diverged: non-finite loss in {losses}")
    trained = _trained_weights(engine.module, bf16=plan.precision == "bf16", keep=rank == 0)
    if rank == 0:
        # a frozen tensor did not train: its delta is exactly zero, not the rounding of a bf16 copy
        trained.update({name: weight for name, weight in champion.items() if name not in trained})
        safeguards = guards.lineage() if guards is not None else None
        _write_candidate(plan, champion, trained, kinds, metrics, safeguards, tokenizer, manifest.version_id, run_dir)
    dist.barrier()
    return metrics


def _trained_weights(module: torch.nn.Module, *, bf16: bool, keep: bool) -> dict[str, torch.Tensor]:
    """The trained tensors (those that require grad), kept on the rank where `keep`; every rank must call this.

    In fp32 the model's parameters are the optimizer's weights. In bf16 they are bf16 copies of fp32 master weights
    partitioned across ranks, so each is gathered with DeepSpeed's `safe_get_full_fp32_param` (a collective): a
    delta from the bf16 copy would carry the bf16 rounding of every weight, trained or not.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    trained: dict[str, torch.Tensor] = {}
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        value = safe_get_full_fp32_param(parameter) if bf16 else parameter.detach()
        if value is None:
            raise RuntimeError(f"DeepSpeed holds no fp32 master weight for {name!r}; cannot take its delta")
        if keep:
            trained[name] = value.detach().to("cpu")
    return trained


def _write_candidate(
    plan: CoreUpdatePlan,
    champion: dict[str, torch.Tensor],
    trained: dict[str, torch.Tensor],
    kinds: dict[str, PartitionKind],
    metrics: dict[str, Any],
    safeguards: dict[str, Any] | None,
    tokenizer: Any,
    champion_version: str,
    run_dir: Path,
) -> None:
    edges = (
        edge_expert_delta(Path(plan.edge_base), [Path(a["path"]) for a in plan.edge_aggregates])
        if (plan.edge_base is not None)
        else {}
    )
    etas = CoreUpdateEtas(core=plan.eta_core, t1=plan.eta_t1, t2=plan.eta_t2)
    combined = combine_core_update(champion, trained, kinds, edges, etas)
    # The trained delta itself stays with the run (not the version): it is what a later re-weighting would need.
    save_file(
        {name: (trained[name].to(weight.dtype) - weight).contiguous() for name, weight in champion.items()},
        str(run_dir / TRAINED_DELTA_NAME),
    )
    # A fresh copy of the champion receives the new weights, so the saved model has the champion's dtype and config.
    model, _ = load_version(plan.champion_dir, expected_version=champion_version)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.data = combined[name].contiguous()
    lineage = {
        "kind": "core_update",
        "champion": {"version_id": champion_version, "path": plan.champion_dir},
        "datasets": [
            {"path": d.path, "sha256": d.sha256, "bytes": d.bytes, "records": d.records, "bad_lines": d.bad_lines}
            for d in plan.datasets
        ],
        "deepspeed": {
            "config": plan.deepspeed_config,
            "accelerator": plan.accelerator,
            "backend": plan.backend,
            "ranks": plan.world_size,
            "precision": plan.precision,
            "deepspeed_version": _deepspeed_version(),
        },
        "etas": {"core": plan.eta_core, "t1": plan.eta_t1, "t2": plan.eta_t2},
        "train_gate": plan.train_gate,
        # which anti-forgetting safeguards ran (null: none asked), with the EWC penalty's last value; not "safeguards",
        # which in a version's lineage describes the safeguard files it ships
        "safeguards_applied": safeguards,
        "edge_base": plan.edge_base,
        "edge_aggregates": plan.edge_aggregates,
        "training": {key: metrics[key] for key in ("steps", "loss_first", "loss_last", "tokens")},
    }
    if plan.lineage_roots:
        # Run by the control plane: the manifest goes to devices, MLflow and DataHub, so files are named by their
        # place in the store; the launcher refused any file outside it, so a path left here is a field it missed.
        lineage = store_references(lineage, plan.lineage_roots)
        if leaked := absolute_paths(lineage):
            raise RuntimeError(f"the candidate's lineage would record server paths {leaked}; none is written")
    save_version(
        model,
        plan.version_dir,
        version_id=plan.version_id,
        parent_version=plan.parent_version or champion_version,
        lineage=lineage,
        tokenizer=tokenizer,
    )
    (run_dir / RESULT_NAME).write_text(json.dumps({"metrics": metrics, "lineage": lineage}, indent=2), "utf-8")


def _deepspeed_version() -> str:
    import deepspeed

    return str(deepspeed.__version__)


def main(argv: list[str] | None = None) -> int:
    """Rank entry point: output goes to <run_dir>/rank-<r>.log; a failure is also written to rank-<r>.failed."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fednested.tier1.core_update PLAN.json", file=sys.stderr)
        return 2
    plan = CoreUpdatePlan.from_json(Path(args[0]).read_text(encoding="utf-8"))
    rank = int(os.environ.get("RANK", "0"))
    run_dir = Path(plan.run_dir)
    log = open(rank_log_path(run_dir, rank), "ab", buffering=0)  # noqa: SIM115 (held for the process's life)
    # DeepSpeed, torch and this code all print to fd 1/2; pointing both at the rank's log keeps every line of it.
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        train_rank(plan, rank)
    except BaseException as error:
        traceback.print_exc()
        sys.stderr.flush()
        rank_failure_path(run_dir, rank).write_text(f"{type(error).__name__}: {error}\n", encoding="utf-8")
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
