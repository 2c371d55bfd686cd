"""The Tier-1 benchmark's plain loop trains on exactly the tokens the ZeRO-2 ranks share between them, so its
tokens/s is comparable; the ranks' side is the product path, tested in tests/fednested/tier1."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench.tier1 import BenchSettings, _prepare, _run_plain
from fednested.checkpoints import load_version
from fednested.data import encode_records, load_tokenizer, read_jsonl
from fednested.tier1.core_update import _rank_windows
from fednested.tier1.plan import CoreUpdatePlan

SETTINGS = BenchSettings(
    preset="tiny", seq_len=64, rows_per_batch=2, steps=2, samples_per_domain=12, tokenizer_vocab=384
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _prepare(tmp_path_factory.mktemp("bench-tier1"), SETTINGS)


def _plan(settings: BenchSettings) -> CoreUpdatePlan:
    # only the fields _rank_windows reads matter; the rest are placeholders of the right type
    return CoreUpdatePlan(
        champion_dir="",
        champion_version="",
        version_id="",
        version_dir="",
        run_dir="",
        datasets=[],
        deepspeed_config={
            "train_micro_batch_size_per_gpu": settings.rows_per_batch,
            "gradient_accumulation_steps": settings.grad_accum_steps,
        },
        accelerator="cpu",
        backend="gloo",
        world_size=settings.ranks,
        precision="fp32",
        seq_len=settings.seq_len,
        max_steps=settings.steps,
        learning_rate=settings.learning_rate,
        weight_decay=0.0,
        warmup_steps=0,
        seed=settings.seed,
        train_gate=False,
        eta_core=1.0,
        eta_t1=1.0,
        eta_t2=1.0,
        cpu_shm_comm=False,
    )


def test_the_plain_loop_trains_on_the_tokens_the_ranks_share(prepared: dict[str, Any]) -> None:
    result = _run_plain(prepared, SETTINGS, threads=1)
    champion = Path(prepared["champion"])
    tokenizer = load_tokenizer(champion)
    examples = encode_records(read_jsonl(prepared["data_path"]).records, tokenizer)
    pad_id = tokenizer.pad_token_id
    assert isinstance(pad_id, int)
    plan = _plan(SETTINGS)
    rank_tokens = sum(
        batch.real_tokens
        for rank in range(SETTINGS.ranks)
        for window in _rank_windows(examples, plan, rank, pad_id, epoch=0)[: SETTINGS.steps]
        for batch in window
    )
    assert result["tokens"] == rank_tokens
    assert result["tokens"] == SETTINGS.steps * SETTINGS.ranks * SETTINGS.rows_per_batch * SETTINGS.seq_len
    assert math.isfinite(result["loss_last"])
    load_version(champion)  # the benchmark's champion is a valid version


def test_the_plain_loop_refuses_too_little_data(prepared: dict[str, Any]) -> None:
    with pytest.raises(RuntimeError, match="too few"):
        _run_plain(prepared, replace(SETTINGS, steps=10_000), threads=1)
