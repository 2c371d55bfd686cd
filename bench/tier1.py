"""Tier-1 core update benchmark: DeepSpeed ZeRO-2 with 2 ranks of 1 thread against a plain single-process PyTorch
loop with 2 threads, on the same model, data, batch and precision, in the same run.

`make bench-tier1` writes bench/results/tier1.json. The ZeRO-2 side is the product path itself (`run_core_update`:
torchrun, the CPU accelerator, gloo); its tokens/s is measured by the ranks over the training loop only (start-up
and the candidate's writing excluded), and the plain loop is timed the same way. Both are full-weight AdamW training
of core and experts with the gates frozen. This is a benchmark, not a test: its figures depend on the machine and on
what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.edge import _active_parameters, _measure_matmul_peak
from bench.report import machine as machine_info
from bench.report import write_report
from fednested.checkpoints import load_version, save_version
from fednested.config import Tier1Config
from fednested.data import (
    BpeTokenizerConfig,
    CorpusConfig,
    encode_records,
    generate_corpus,
    load_tokenizer,
    read_jsonl,
    record_texts,
    train_bpe_tokenizer,
    write_jsonl,
)
from fednested.data.packing import iter_batches, pack_examples
from fednested.models import build_model
from fednested.partition import partition_model
from fednested.tier1 import run_core_update
from fednested.training.forward import packed_loss_sum

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "tier1.json"
FLOP_FORMULA = (
    "model FLOPs per trained token = 6 * N_active (forward 2N, backward to activations 2N, weight gradients 2N); "
    "N_active = all parameters except the input embedding, experts counted at experts_per_token/num_experts, LM head "
    "included (the router is frozen but counted: its FLOPs are negligible). Attention-score FLOPs are left out. Only "
    "non-padding tokens count. The peak is the best fp32 GEMM rate with 2 threads, the machine's 2 cores."
)


@dataclass(frozen=True)
class BenchSettings:
    """What both loops share: model, data, batch shape, steps."""

    preset: str = "tiny"
    seq_len: int = 128
    rows_per_batch: int = 2  # per rank; the plain loop takes ranks x this per micro-batch
    grad_accum_steps: int = 1
    steps: int = 20
    ranks: int = 2
    plain_threads: int = 2
    learning_rate: float = 1e-4
    samples_per_domain: int = 100
    tokenizer_vocab: int = 2048
    seed: int = 0
    repeats: int = 2


def _prepare(workdir: Path, settings: BenchSettings) -> dict[str, Any]:
    corpus = generate_corpus(CorpusConfig(seed=0, train_samples=settings.samples_per_domain, heldout_samples=1))
    records = [record for domain in corpus.values() for record in domain.records("train", "text")]
    data_path = workdir / "train.jsonl"
    write_jsonl(data_path, records)
    tokenizer = train_bpe_tokenizer(record_texts(records), BpeTokenizerConfig(vocab_size=settings.tokenizer_vocab))
    model = build_model(settings.preset, "mixtral", vocab_size=len(tokenizer), seed=0)
    save_version(model, workdir / "champion", version_id="bench-champion", parent_version=None, tokenizer=tokenizer)
    return {
        "data_path": data_path,
        "champion": workdir / "champion",
        "records": len(records),
        "vocab": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "active_parameters": _active_parameters(model),
    }


def _run_zero2(prepared: dict[str, Any], settings: BenchSettings, workdir: Path, version_id: str) -> dict[str, Any]:
    config = Tier1Config.model_validate(
        {
            "training": {
                "train_files": [prepared["data_path"]],
                "seq_len": settings.seq_len,
                "rows_per_batch": settings.rows_per_batch,
                "grad_accum_steps": settings.grad_accum_steps,
                "max_steps": settings.steps,
                "learning_rate": settings.learning_rate,
                "precision": "fp32",
                "ranks": settings.ranks,
                "zero_stage": 2,
                "seed": settings.seed,
            },
            "core_update": {
                "champion_dir": prepared["champion"],
                "output_dir": workdir / "versions",
                "accelerator": "cpu",
            },
            "storage": {"checkpoint_dir": workdir / "runs"},
        }
    )
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread per rank: 2 ranks use the same 2 cores as the plain loop
    started = time.perf_counter()
    result = run_core_update(config, version_id=version_id)
    metrics = dict(result.metrics)
    metrics["process_seconds"] = time.perf_counter() - started
    metrics["deepspeed_config"] = result.lineage["deepspeed"]["config"]
    return metrics


def _run_plain(prepared: dict[str, Any], settings: BenchSettings, threads: int) -> dict[str, Any]:
    """The same training without DeepSpeed: one process, `threads` threads, a micro-batch of ranks x rows."""
    torch.set_num_threads(threads)
    torch.manual_seed(settings.seed)
    model, _ = load_version(prepared["champion"])
    tokenizer = load_tokenizer(prepared["champion"])
    partition = partition_model(model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(partition.kind_of_file(name) != "gate")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate)
    examples = encode_records(read_jsonl(prepared["data_path"]).records, tokenizer)
    pad_id = tokenizer.pad_token_id
    assert isinstance(pad_id, int)
    order = list(range(len(examples)))
    random.Random(settings.seed * 1_000_003).shuffle(order)  # the ranks' epoch-0 order
    rows = pack_examples([examples[index] for index in order], settings.seq_len, pad_id=pad_id)
    batches = list(iter_batches(rows, settings.rows_per_batch * settings.ranks))
    accum = settings.grad_accum_steps
    if len(batches) < settings.steps * accum:
        raise RuntimeError(f"{len(batches)} batches are too few for {settings.steps} steps; add samples")
    tokens = 0
    losses = []
    started = time.perf_counter()
    for step in range(settings.steps):
        for batch in batches[step * accum : (step + 1) * accum]:
            loss_sum, count = packed_loss_sum(model, batch, precision="fp32")
            torch.autograd.backward(loss_sum / max(count, 1) / accum)
            tokens += batch.real_tokens
            losses.append(float(loss_sum.detach()) / max(count, 1))
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    duration = time.perf_counter() - started
    return {
        "steps": settings.steps,
        "tokens": tokens,
        "train_seconds": duration,
        "tokens_per_s": tokens / duration,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def _spawn_plain(prepared: dict[str, Any], settings: BenchSettings, threads: int) -> dict[str, Any]:
    """The plain loop in a fresh process whose OpenMP threads sleep instead of spinning while they wait
    (OMP_WAIT_POLICY=PASSIVE, read when torch loads libgomp): on a shared, oversubscribed machine a spinning 2-thread
    team stalls at every parallel region and ran 20x slower here, which would flatter DeepSpeed's 1-thread ranks."""
    spec = {"settings": asdict(settings), "threads": threads, **{k: str(v) for k, v in prepared.items()}}
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    completed = subprocess.run(
        [sys.executable, "-m", "bench.tier1", "--plain-worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"plain loop ({threads} threads) failed:\n{completed.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def _plain_worker(raw: str) -> int:
    spec = json.loads(raw)
    settings = BenchSettings(**spec["settings"])
    prepared = {"champion": Path(spec["champion"]), "data_path": Path(spec["data_path"])}
    print(json.dumps(_run_plain(prepared, settings, int(spec["threads"]))))
    return 0


def run_benchmark(settings: BenchSettings, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    machine = machine_info(settings.plain_threads)
    with tempfile.TemporaryDirectory(prefix="bench-tier1-") as tmp:
        workdir = Path(tmp)
        prepared = _prepare(workdir, settings)
        attempts: dict[str, list[dict[str, Any]]] = {"zero2": [], "plain": [], "plain_one_thread": []}
        # Interleaved repeats, best of each kept: on a shared machine a configuration that hit a busy minute must
        # not decide the ratio. The one-thread loop is context, not the headline: the same loop on one core.
        for repeat in range(settings.repeats):
            print(f"repeat {repeat + 1}: ZeRO-2, 2 ranks x 1 thread ...", file=sys.stderr, flush=True)
            attempts["zero2"].append(_run_zero2(prepared, settings, workdir, f"bench-zero2-{repeat}"))
            attempts["plain"].append(_spawn_plain(prepared, settings, settings.plain_threads))
            attempts["plain_one_thread"].append(_spawn_plain(prepared, settings, 1))
            print(
                "  tokens/s: " + ", ".join(f"{k} {v[-1]['tokens_per_s']:.0f}" for k, v in attempts.items()),
                file=sys.stderr,
                flush=True,
            )
        zero2, plain, plain_one_thread = (
            max(attempts[k], key=lambda run: run["tokens_per_s"]) for k in ("zero2", "plain", "plain_one_thread")
        )
        peak = _measure_matmul_peak(settings.plain_threads)
    flops_per_token = 6 * prepared["active_parameters"]
    for run in (zero2, plain, plain_one_thread):
        run["model_gflops_per_s"] = flops_per_token * run["tokens_per_s"] / 1e9
        run["mfu"] = run["model_gflops_per_s"] / peak["fp32_matmul_gflops"]
    ratio = zero2["tokens_per_s"] / plain["tokens_per_s"]
    report: dict[str, Any] = {
        "schema": "fednested.bench.tier1/1",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "settings": asdict(settings),
        "model": {k: prepared[k] for k in ("parameters", "active_parameters", "vocab")},
        "data": {"records": prepared["records"]},
        "flop_formula": FLOP_FORMULA,
        "peak_fp32_matmul_gflops": peak["fp32_matmul_gflops"],
        "zero2": zero2,
        "plain": plain,
        "plain_one_thread": plain_one_thread,
        "attempts_tokens_per_s": {k: [run["tokens_per_s"] for run in v] for k, v in attempts.items()},
        "zero2_vs_plain_one_thread": zero2["tokens_per_s"] / plain_one_thread["tokens_per_s"],
        "zero2_vs_plain": ratio,
        "mfu": zero2["mfu"],
        "mfu_plain": plain["mfu"],
        "targets": {"zero2_vs_plain": {"target": ">= 0.8", "met": ratio >= 0.8}},
    }
    return write_report(report, out, started=started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    parser.add_argument("--preset", default=BenchSettings.preset)
    parser.add_argument("--steps", type=int, default=BenchSettings.steps)
    parser.add_argument("--seq-len", type=int, default=BenchSettings.seq_len)
    parser.add_argument("--rows-per-batch", type=int, default=BenchSettings.rows_per_batch)
    parser.add_argument("--plain-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain_worker:
        return _plain_worker(args.plain_worker)
    settings = BenchSettings(
        preset=args.preset, steps=args.steps, seq_len=args.seq_len, rows_per_batch=args.rows_per_batch
    )
    report = run_benchmark(settings, args.out)
    print(json.dumps({key: report[key] for key in ("zero2_vs_plain", "mfu", "mfu_plain")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
