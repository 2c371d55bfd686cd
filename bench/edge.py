"""Edge training benchmark: our adapter loop against PEFT's documented loop and PEFT on our packed batches, and
peak RSS of fp32 / int8 / NF4 bases on the `medium` preset, where weights dominate the process.

`make bench-edge` writes bench/results/edge.json. Every configuration runs in a fresh subprocess, so each peak RSS
is its own; the fp32 matmul peak that MFU is measured against is taken in the same run, on the same threads.
This is a benchmark, not a test: its figures depend on the machine and on what else runs on it.
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bench.report import machine as machine_info
from bench.report import peak_rss_mb, rss_mb, write_report
from fednested.data import (
    BpeTokenizerConfig,
    CorpusConfig,
    TextRecord,
    generate_corpus,
    load_tokenizer,
    read_jsonl,
    record_texts,
    train_bpe_tokenizer,
    write_jsonl,
)

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "edge.json"
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
FLOP_FORMULA = (
    "model FLOPs per trained token = 4 * N_active: forward 2*N_active plus backward to the activations 2*N_active; "
    "the frozen base needs no weight gradients (that is the third 2*N of the usual 6*N), and LoRA's own FLOPs "
    "(rank 8) and the attention-score FLOPs (block-diagonal, records of ~100 tokens) are left out, so this slightly "
    "understates the work. N_active = all parameters except the input embedding, with expert parameters counted at "
    "experts_per_token/num_experts (the share of experts each token passes through), LM head included. Only "
    "non-padding tokens count, so padding a batch lowers MFU instead of inflating it."
)


@dataclass(frozen=True)
class BenchSettings:
    """What every configuration shares: data, batch shape, LoRA rank and how many steps are timed."""

    seq_len: int = 256
    rows_per_batch: int = 2
    grad_accum_steps: int = 4
    warmup_steps: int = 1
    timed_steps: int = 4
    lora_rank: int = 8
    lora_alpha: int = 16
    learning_rate: float = 1e-3
    corpus_seed: int = 0
    samples_per_domain: int = 300
    tokenizer_vocab: int = 4096
    threads: int = 0  # 0: probe and take the fastest
    # The preset where weights dominate the process, for the memory figures (fp32 / int8 / NF4 base, expert
    # recompute on all three); "" skips them. Peak RSS of a micro-batch does not depend on how many are accumulated,
    # so these runs take `memory_steps` optimizer steps of one micro-batch each: the second runs with AdamW's state.
    memory_preset: str = "medium"
    memory_steps: int = 2


# --------------------------------------------------------------------------------------------------------------------
# worker side: one configuration per process


def _measure_matmul_peak(threads: int) -> dict[str, Any]:
    """Best fp32 GEMM throughput over a few square sizes: the ceiling MFU is measured against."""
    torch.set_num_threads(threads)
    best = 0.0
    by_size = {}
    for size in (512, 1024, 2048):
        left, right = torch.randn(size, size), torch.randn(size, size)
        torch.mm(left, right)  # first call pays for oneDNN's kernel selection
        reps = max(2, int(4e9 / (2 * size**3)))
        fastest = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(reps):
                torch.mm(left, right)
            fastest = min(fastest, (time.perf_counter() - started) / reps)
        by_size[str(size)] = 2 * size**3 / fastest / 1e9
        best = max(best, by_size[str(size)])
    return {"kind": "peak", "fp32_matmul_gflops": best, "gflops_by_size": by_size}


def _text_records(data_path: Path) -> list[TextRecord]:
    return [record for record in read_jsonl(data_path, strict=True).records if isinstance(record, TextRecord)]


def _run_ours(spec: dict[str, Any], settings: BenchSettings) -> dict[str, Any]:
    from fednested.adapters import ExpertLoraConfig, attach_expert_adapters
    from fednested.checkpoints import load_version
    from fednested.data import encode_records
    from fednested.quantization import load_quantized_version, pin_mmap_threshold
    from fednested.training import EdgeTrainConfig, train_adapters

    memory_run = bool(spec.get("memory"))
    if memory_run:
        # a quantized load pins glibc's mmap threshold (fednested.quantization.pin_mmap_threshold); the memory runs
        # compare bases, so the fp32 one runs under the same allocator policy
        pin_mmap_threshold()
    version = Path(spec["version_dir"])
    tokenizer = load_tokenizer(version)
    records = _text_records(Path(spec["data_path"]))
    baseline = rss_mb()
    model: torch.nn.Module
    if spec["bits"] is None:
        model, _ = load_version(version)
    else:
        model, _ = load_quantized_version(version, spec["bits"])
    loaded = rss_mb()
    adapted = attach_expert_adapters(
        model, ExpertLoraConfig(rank=settings.lora_rank, alpha=settings.lora_alpha, init_seed=0)
    )
    examples = encode_records(records, tokenizer)

    def config(steps: int, seed: int) -> EdgeTrainConfig:
        return EdgeTrainConfig(
            seq_len=settings.seq_len,
            rows_per_batch=settings.rows_per_batch,
            grad_accum_steps=1 if memory_run else settings.grad_accum_steps,
            learning_rate=settings.learning_rate,
            max_steps=steps,
            seed=seed,
            precision=spec["precision"],
            num_threads=settings.threads,
            recompute_experts=bool(spec.get("recompute")),
        )

    if not memory_run:  # a memory run's first step is part of what it measures
        train_adapters(adapted, tokenizer, examples, config(settings.warmup_steps, seed=1))
    metrics = train_adapters(
        adapted, tokenizer, examples, config(settings.memory_steps if memory_run else settings.timed_steps, seed=0)
    )
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    return {
        "tokens": metrics.tokens,
        "padding_tokens": metrics.padding_tokens,
        "seconds": metrics.duration_s,
        "tokens_per_s": metrics.tokens_per_s,
        "steps": metrics.steps,
        "loss_first": metrics.loss_curve[0],
        "loss_last": metrics.loss_curve[-1],
        "precision": metrics.precision,
        "trainable_parameters": trainable,
        "baseline_rss_mb": baseline,
        "loaded_rss_mb": loaded,
        "peak_rss_mb": peak_rss_mb(),
    }


def _run_reference(spec: dict[str, Any], settings: BenchSettings) -> dict[str, Any]:
    """The loop as PEFT's documentation writes it: LoraConfig(target_parameters=...) on the fused experts,
    DataCollatorForLanguageModeling padding each batch to its longest record, `model(**batch).loss`, AdamW."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForLanguageModeling

    from fednested.checkpoints import load_version

    torch.set_num_threads(settings.threads)
    version = Path(spec["version_dir"])
    tokenizer = load_tokenizer(version)
    records = _text_records(Path(spec["data_path"]))
    baseline = rss_mb()
    base, _ = load_version(version)
    loaded = rss_mb()
    lora = LoraConfig(
        r=settings.lora_rank, lora_alpha=settings.lora_alpha, target_modules=[], target_parameters=EXPERT_TARGETS
    )
    model = get_peft_model(base, lora)
    eos = tokenizer.eos_token or ""
    features = [tokenizer(record.text + eos, truncation=True, max_length=settings.seq_len) for record in records]
    mean_length = sum(len(feature["input_ids"]) for feature in features) / len(features)
    # As many records per batch as fill the tokens of one of our packed micro-batches: the same real tokens per
    # forward (so comparable activation memory), and as many batches as our run has micro-batches.
    batch_size = max(1, round(settings.seq_len * settings.rows_per_batch / mean_length))
    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
    loader: DataLoader[Any] = DataLoader(
        features,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collator,
        generator=torch.Generator().manual_seed(0),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    model.train()
    batches = iter(loader)
    tokens = padding = 0
    losses: list[float] = []
    started = 0.0
    warmup = settings.warmup_steps * settings.grad_accum_steps
    for step in range(warmup + settings.timed_steps * settings.grad_accum_steps):
        if step == warmup:
            started = time.perf_counter()
        batch = next(batches)
        outputs = model(**batch)
        loss = outputs.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= warmup:
            real = int(batch["attention_mask"].sum())
            tokens += real
            padding += batch["attention_mask"].numel() - real
            losses.append(float(loss.detach()))
    seconds = time.perf_counter() - started
    return {
        "tokens": tokens,
        "padding_tokens": padding,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "steps": settings.timed_steps * settings.grad_accum_steps,
        "batch_size": batch_size,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "precision": "fp32",
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "baseline_rss_mb": baseline,
        "loaded_rss_mb": loaded,
        "peak_rss_mb": peak_rss_mb(),
    }


def _packed_windows(
    examples: list[Any], tokenizer: Any, settings: BenchSettings, seed: int, steps: int
) -> list[list[Any]]:
    """The first `steps` optimizer steps of packed micro-batches, built the way `train_adapters` builds its epoch
    (records shuffled by `seed`, `pack_examples` into `seq_len` rows, `rows_per_batch` rows per micro-batch), so
    the packed reference trains on exactly the batches our loop does."""
    from fednested.data.packing import iter_batches, pack_examples

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    pad_id = tokenizer.pad_token_id if isinstance(tokenizer.pad_token_id, int) else tokenizer.eos_token_id
    rows = pack_examples([examples[index] for index in order], settings.seq_len, pad_id=pad_id)
    batches = list(iter_batches(rows, settings.rows_per_batch))
    size = settings.grad_accum_steps
    return [batches[start : start + size] for start in range(0, size * steps, size)]


def _run_packed_reference(spec: dict[str, Any], settings: BenchSettings) -> dict[str, Any]:
    """The strongest loop a careful user writes with maintained tools: PEFT's LoRA on the fused experts as its
    documentation configures it, fed the same packed micro-batches and gradient accumulation as our loop.

    Packed rows go in with position ids that restart at every record and no attention mask, which transformers
    turns into a block-diagonal causal mask (what TRL's padding-free packing does too); `num_items_in_batch` makes
    the accumulated loss the mean over the optimizer step's targets, as ours is. What remains different is the
    model core: PEFT folds W + s·B·A for every expert on every forward and computes the LM head on every position.
    """
    from peft import LoraConfig, get_peft_model

    from fednested.checkpoints import load_version
    from fednested.data import encode_records
    from fednested.data.encoding import IGNORE_INDEX

    torch.set_num_threads(settings.threads)
    version = Path(spec["version_dir"])
    tokenizer = load_tokenizer(version)
    records = _text_records(Path(spec["data_path"]))
    baseline = rss_mb()
    base, _ = load_version(version)
    loaded = rss_mb()
    lora = LoraConfig(
        r=settings.lora_rank, lora_alpha=settings.lora_alpha, target_modules=[], target_parameters=EXPERT_TARGETS
    )
    model = get_peft_model(base, lora)
    examples = encode_records(records, tokenizer)
    warmup = _packed_windows(examples, tokenizer, settings, seed=1, steps=settings.warmup_steps)
    timed = _packed_windows(examples, tokenizer, settings, seed=0, steps=settings.timed_steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate)
    model.train()
    tokens = padding = 0
    losses: list[float] = []
    started = 0.0
    for index, window in enumerate(warmup + timed):
        if index == len(warmup):
            started = time.perf_counter()
        items = sum(batch.target_tokens for batch in window)
        step_loss = 0.0
        for batch in window:
            # transformers shifts labels itself; PackedBatch.targets are already shifted (targets[t] = labels[t+1])
            ignore = torch.full((batch.targets.shape[0], 1), IGNORE_INDEX, dtype=batch.targets.dtype)
            labels = torch.cat([ignore, batch.targets[:, :-1]], dim=1)
            outputs = model(
                input_ids=batch.input_ids,
                position_ids=batch.position_ids,
                labels=labels,
                num_items_in_batch=items,
            )
            outputs.loss.backward()
            step_loss += float(outputs.loss.detach())
            if index >= len(warmup):
                tokens += batch.real_tokens
                padding += batch.input_ids.numel() - batch.real_tokens
        optimizer.step()
        optimizer.zero_grad()
        if index >= len(warmup):
            losses.append(step_loss)
    seconds = time.perf_counter() - started
    return {
        "tokens": tokens,
        "padding_tokens": padding,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "steps": settings.timed_steps,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "precision": "fp32",
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "baseline_rss_mb": baseline,
        "loaded_rss_mb": loaded,
        "peak_rss_mb": peak_rss_mb(),
    }


def _probe_threads(max_threads: int) -> dict[str, Any]:
    """Throughput of the GEMM shapes an edge step is made of, per thread count; the fastest count wins.

    On an idle device that is every core; on a machine shared with other jobs a second OpenMP thread that keeps
    being descheduled stalls every barrier, and one thread can be several times faster.
    """
    shapes = ((512, 384, 2048), (512, 1024, 384), (512, 384, 384))
    operands = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    by_threads = {}
    for threads in range(1, max_threads + 1):
        torch.set_num_threads(threads)
        fastest = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(10):
                for left, right in operands:
                    torch.mm(left, right)
            fastest = min(fastest, (time.perf_counter() - started) / 10)
        by_threads[str(threads)] = flops / fastest / 1e9
    best = max(by_threads, key=lambda key: by_threads[key])
    return {"kind": "threads", "gflops_by_threads": by_threads, "best_threads": int(best)}


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    settings = BenchSettings(**spec["settings"])
    if spec["kind"] == "threads":
        # the cores this process may run on (taskset/cgroup), not every core of the machine
        return _probe_threads(len(os.sched_getaffinity(0)))
    torch.set_num_threads(settings.threads)
    torch.manual_seed(0)
    if spec["kind"] == "peak":
        return _measure_matmul_peak(settings.threads)
    if spec["kind"] == "ours":
        return _run_ours(spec, settings)
    if spec["kind"] == "packed-reference":
        return _run_packed_reference(spec, settings)
    return _run_reference(spec, settings)


# --------------------------------------------------------------------------------------------------------------------
# parent side: data, snapshots, one subprocess per configuration, the report


def _active_parameters(model: torch.nn.Module) -> int:
    config: Any = getattr(model, "config")  # noqa: B009 (nn.Module declares no config)
    share: float = config.num_experts_per_tok / config.num_local_experts
    total = 0.0
    for name, parameter in model.named_parameters():
        if "embed_tokens" in name:
            continue
        total += parameter.numel() * (share if ".experts." in name else 1.0)
    return round(total)


def _prepare(workdir: Path, settings: BenchSettings, presets: list[str]) -> dict[str, Any]:
    from fednested.checkpoints import save_version
    from fednested.models import build_model, count_parameters

    corpus = generate_corpus(
        CorpusConfig(seed=settings.corpus_seed, train_samples=settings.samples_per_domain, heldout_samples=1)
    )
    records = [record for domain in corpus.values() for record in domain.records("train", "text")]
    data_path = workdir / "train.text.jsonl"
    write_jsonl(data_path, records)
    tokenizer = train_bpe_tokenizer(record_texts(records), BpeTokenizerConfig(vocab_size=settings.tokenizer_vocab))
    models = {}
    for preset in presets:
        model = build_model(preset, "mixtral", vocab_size=len(tokenizer), seed=0)
        save_version(model, workdir / preset, version_id=f"bench-{preset}", parent_version=None, tokenizer=tokenizer)
        models[preset] = {
            "parameters": count_parameters(model),
            "active_parameters": _active_parameters(model),
            "config": {
                key: getattr(model.config, key)
                for key in (
                    "hidden_size",
                    "num_hidden_layers",
                    "num_local_experts",
                    "num_experts_per_tok",
                    "intermediate_size",
                    "vocab_size",
                )
            },
        }
        del model
    return {"data_path": str(data_path), "records": len(records), "vocab": len(tokenizer), "models": models}


def _spawn(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "bench.edge", "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark worker {spec.get('name')} failed:\n{completed.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - started
    return result


def _configurations(presets: list[str], headline: str, memory_preset: str) -> list[dict[str, Any]]:
    """Every configuration once, the headline trio (both references and ours on the headline preset) twice,
    interleaved: on a shared machine the load drifts, and best-of-two per loop keeps one unlucky minute from deciding
    a ratio. Then the memory runs on `memory_preset` (fp32, int8 and NF4 base; same adapters, batch, recompute)."""
    runs: list[dict[str, Any]] = []
    for preset in presets:
        reference = {"name": f"reference/{preset}/fp32", "kind": "reference", "preset": preset, "bits": None}
        packed = {"name": f"packed-reference/{preset}/fp32", "kind": "packed-reference", "preset": preset, "bits": None}
        ours = {"name": f"ours/{preset}/fp32", "kind": "ours", "preset": preset, "bits": None, "precision": "auto"}
        runs += [reference, packed, ours]
        if preset == headline:
            runs += [reference, packed, ours]
            # the evidence behind precision="auto" (fp32 on CPU): the same run with bf16 autocast forced
            runs.append({**ours, "name": f"ours/{preset}/fp32+bf16-autocast", "precision": "bf16"})
        for bits, label in ((8, "int8"), (4, "nf4")):
            runs.append({**ours, "name": f"ours/{preset}/{label}", "bits": bits})
    if memory_preset:
        memory: tuple[tuple[int | None, str], ...] = ((None, "fp32"), (8, "int8"), (4, "nf4"))
        for bits, label in memory:
            runs.append(
                {
                    "name": f"ours/{memory_preset}/{label}+recompute",
                    "kind": "ours",
                    "preset": memory_preset,
                    "bits": bits,
                    "precision": "auto",
                    "recompute": True,
                    "memory": True,
                }
            )
    return runs


def _best(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    best = dict(max(attempts, key=lambda run: run["tokens_per_s"]))
    best["attempts_tokens_per_s"] = [run["tokens_per_s"] for run in attempts]
    return best


def run_benchmark(settings: BenchSettings, presets: list[str], out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    headline = "small" if "small" in presets else presets[-1]
    memory_preset = settings.memory_preset
    built = presets + ([memory_preset] if memory_preset and memory_preset not in presets else [])
    with tempfile.TemporaryDirectory(prefix="fednested-bench-") as tmp:
        workdir = Path(tmp)
        prepared = _prepare(workdir, settings, built)
        common = {"data_path": prepared["data_path"]}
        probe: dict[str, Any] = {"kind": "threads", "skipped": "--threads was given"}
        if settings.threads <= 0:
            probe = _spawn({**common, "kind": "threads", "settings": asdict(settings)}, timeout_s=300)
            settings = replace(settings, threads=int(probe["best_threads"]))
        common["settings"] = asdict(settings)
        machine = machine_info(settings.threads)
        peaks = [_spawn({**common, "kind": "peak"}, timeout_s=300)]
        attempts: dict[str, list[dict[str, Any]]] = {}
        for spec in _configurations(presets, headline, memory_preset):
            print(f"running {spec['name']} ...", file=sys.stderr, flush=True)
            result = _spawn({**common, **spec, "version_dir": str(workdir / spec["preset"])}, timeout_s=600)
            result.update(
                name=spec["name"],
                kind=spec["kind"],
                preset=spec["preset"],
                base={None: "fp32", 8: "int8", 4: "nf4"}[spec["bits"]],
                recompute_experts=bool(spec.get("recompute")),
                memory_run=bool(spec.get("memory")),
                padding_fraction=result["padding_tokens"] / (result["tokens"] + result["padding_tokens"]),
                peak_rss_above_baseline_mb=result["peak_rss_mb"] - result["baseline_rss_mb"],
            )
            print(
                f"  {result['tokens_per_s']:.0f} tokens/s, peak RSS {result['peak_rss_mb']:.0f} MB",
                file=sys.stderr,
                flush=True,
            )
            attempts.setdefault(spec["name"], []).append(result)
        peaks.append(_spawn({**common, "kind": "peak"}, timeout_s=300))
    # The ceiling is the best the GEMM reached in either probe: a probe that hit a busy minute must not flatter MFU.
    peak_gflops = max(peak["fp32_matmul_gflops"] for peak in peaks)
    runs = []
    for tries in attempts.values():
        run = _best(tries)
        achieved = 4 * prepared["models"][run["preset"]]["active_parameters"] * run["tokens_per_s"]
        run["model_gflops_per_s"] = achieved / 1e9
        run["mfu"] = achieved / (peak_gflops * 1e9)
        runs.append(run)
    by_name = {run["name"]: run for run in runs}
    report: dict[str, Any] = {
        "schema": "fednested.bench.edge/1",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "torch_threads": settings.threads,
        "thread_probe": probe,
        "settings": asdict(settings),
        "data": {"records": prepared["records"], "tokenizer_vocab": prepared["vocab"]},
        "models": prepared["models"],
        "flop_formula": FLOP_FORMULA,
        "peak_fp32_matmul_gflops": peak_gflops,
        "peak_fp32_matmul_probes": peaks,
        "runs": runs,
    }
    ours, reference = by_name[f"ours/{headline}/fp32"], by_name[f"reference/{headline}/fp32"]
    packed = by_name[f"packed-reference/{headline}/fp32"]
    report["headline_preset"] = headline
    report["speedup_vs_reference"] = ours["tokens_per_s"] / reference["tokens_per_s"]
    report["speedup_vs_packed_reference"] = ours["tokens_per_s"] / packed["tokens_per_s"]
    report["speedup_vs_reference_bf16_autocast"] = (
        by_name[f"ours/{headline}/fp32+bf16-autocast"]["tokens_per_s"] / reference["tokens_per_s"]
    )
    report["mfu"] = ours["mfu"]
    report["mfu_reference"] = reference["mfu"]
    report["mfu_packed_reference"] = packed["mfu"]
    four_bit = by_name[f"ours/{headline}/nf4"]
    # on the headline preset the ~1 GB import baseline and activations dominate; kept to show why `medium` exists
    report["rss_ratio_4bit_headline"] = four_bit["peak_rss_mb"] / ours["peak_rss_mb"]
    report["rss_ratio_4bit_headline_above_baseline"] = (
        four_bit["peak_rss_above_baseline_mb"] / ours["peak_rss_above_baseline_mb"]
    )
    report["memory_preset"] = memory_preset or None
    rss_met = False
    if memory_preset:
        full, eight, four = (by_name[f"ours/{memory_preset}/{label}+recompute"] for label in ("fp32", "int8", "nf4"))
        report["rss_ratio_4bit"] = four["peak_rss_above_baseline_mb"] / full["peak_rss_above_baseline_mb"]
        report["rss_ratio_8bit"] = eight["peak_rss_above_baseline_mb"] / full["peak_rss_above_baseline_mb"]
        report["rss_ratio_4bit_total"] = four["peak_rss_mb"] / full["peak_rss_mb"]
        rss_met = report["rss_ratio_4bit"] <= 0.4
    report["targets"] = {
        "speedup_vs_reference": {"target": ">= 1.5", "met": report["speedup_vs_reference"] >= 1.5},
        "speedup_vs_packed_reference": {"target": ">= 1.5", "met": report["speedup_vs_packed_reference"] >= 1.5},
        "mfu": {"target": ">= 0.5 (aim)", "met": report["mfu"] >= 0.5},
        "rss_ratio_4bit": {
            "target": f"<= 0.4 (NF4 / fp32 peak RSS above the import baseline, {memory_preset or 'not run'})",
            "met": rss_met,
        },
    }
    return write_report(report, out, started=started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    parser.add_argument("--presets", default="tiny,small", help="comma-separated model presets")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads; 0 (default) picks the fastest count by a probe"
    )
    parser.add_argument("--timed-steps", type=int, default=BenchSettings.timed_steps)
    parser.add_argument("--rows-per-batch", type=int, default=BenchSettings.rows_per_batch)
    parser.add_argument("--grad-accum-steps", type=int, default=BenchSettings.grad_accum_steps)
    parser.add_argument(
        "--memory-preset",
        default=BenchSettings.memory_preset,
        help="preset of the fp32/int8/NF4 peak-RSS runs ('' skips them)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps({"kind": "result", **_worker(json.loads(args.worker))}))
        return 0
    settings = BenchSettings(
        threads=args.threads,
        timed_steps=args.timed_steps,
        rows_per_batch=args.rows_per_batch,
        grad_accum_steps=args.grad_accum_steps,
        memory_preset=args.memory_preset,
    )
    report = run_benchmark(settings, [name.strip() for name in args.presets.split(",") if name.strip()], args.out)
    keys = ("speedup_vs_reference", "speedup_vs_packed_reference", "mfu", "mfu_packed_reference", "rss_ratio_4bit")
    print(json.dumps({key: report.get(key) for key in (*keys, "torch_threads", "wall_seconds")}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
