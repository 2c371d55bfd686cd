"""The edge benchmark's pieces on `tiny`: the packed reference computes our loss on our batches, memory runs take the
steps they claim, and the run list interleaves the headline loops and measures every base on the memory preset."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.edge import BenchSettings, _configurations, _packed_windows, _prepare, _run_ours, _run_packed_reference
from fednested.checkpoints import load_version
from fednested.data import encode_records, load_tokenizer, read_jsonl
from fednested.training.forward import packed_loss_sum

SETTINGS = BenchSettings(
    seq_len=64,
    rows_per_batch=2,
    grad_accum_steps=1,
    warmup_steps=0,
    timed_steps=1,
    samples_per_domain=20,
    tokenizer_vocab=512,
    threads=1,
)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("bench-edge")
    prepared = _prepare(workdir, SETTINGS, ["tiny"])
    return {**prepared, "version_dir": str(workdir / "tiny")}


def _spec(prepared: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"data_path": prepared["data_path"], "version_dir": prepared["version_dir"], "preset": "tiny", **extra}


# PEFT 0.21 still asks transformers 5 for the renamed `is_gradient_checkpointing`; nothing for us to act on
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_the_packed_reference_computes_our_loss_on_our_packed_batches(prepared: dict[str, Any]) -> None:
    result = _run_packed_reference(_spec(prepared, kind="packed-reference", bits=None), SETTINGS)
    assert result["padding_tokens"] == 0
    assert result["tokens"] == SETTINGS.rows_per_batch * SETTINGS.seq_len

    # No warm-up: PEFT's B factors are still zero, so its first loss is the base model's on the first window; ours
    # (packed_loss_sum over the same batch, divided by its targets) must give the same number. This checks the label
    # shift and that transformers reads the restarting position ids as separate records in both loops.
    version = Path(prepared["version_dir"])
    tokenizer = load_tokenizer(version)
    records = read_jsonl(Path(prepared["data_path"]), strict=True).records
    examples = encode_records(records, tokenizer)
    (window,) = _packed_windows(examples, tokenizer, SETTINGS, seed=0, steps=1)
    base, _ = load_version(version)
    with torch.no_grad():
        loss_sum, targets = packed_loss_sum(base, window[0])
    assert result["loss_first"] == pytest.approx(float(loss_sum) / targets, rel=1e-5)


def test_a_memory_run_takes_its_steps_of_one_micro_batch_without_warm_up(prepared: dict[str, Any]) -> None:
    settings = replace(SETTINGS, warmup_steps=1, grad_accum_steps=4, memory_steps=2)
    spec = _spec(prepared, kind="ours", bits=4, precision="auto", recompute=True, memory=True)
    result = _run_ours(spec, settings)
    assert result["steps"] == 2
    assert result["tokens"] == 2 * settings.rows_per_batch * settings.seq_len
    assert result["peak_rss_mb"] >= result["loaded_rss_mb"] > 0


def test_runs_interleave_the_headline_loops_and_measure_every_base_on_the_memory_preset() -> None:
    names = [run["name"] for run in _configurations(["tiny", "small"], "small", "medium")]
    headline = [name for name in names if name.split("/")[1] == "small" and name.endswith("/fp32")]
    trio = ["reference/small/fp32", "packed-reference/small/fp32", "ours/small/fp32"]
    assert headline == trio + trio
    memory = [run for run in _configurations(["tiny", "small"], "small", "medium") if run.get("memory")]
    assert [(run["preset"], run["bits"], run["recompute"]) for run in memory] == [
        ("medium", None, True),
        ("medium", 8, True),
        ("medium", 4, True),
    ]
    assert not any(run.get("memory") for run in _configurations(["tiny"], "tiny", ""))
