"""The demo's starting point: a seeded multi-domain corpus, a BPE tokenizer and a `tiny` MoE model briefly
pre-trained on a general mix of every domain, saved as the first immutable version. Pure fednested, no Django."""

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from fednested.checkpoints import Manifest, save_version
from fednested.data import (
    BpeTokenizerConfig,
    CorpusConfig,
    DomainCorpus,
    Record,
    generate_corpus,
    record_texts,
    train_bpe_tokenizer,
)
from fednested.models import build_model
from fednested.training.edge import EdgeTrainConfig, TrainMetrics, train_adapters


@dataclass(frozen=True)
class BootstrapConfig:
    """Sizes of the demo's corpus, tokenizer and pre-training: small enough for a few minutes on two CPU cores."""

    seed: int = 0
    preset: str = "tiny"
    family: str = "mixtral"
    train_samples: int = 96
    heldout_samples: int = 16
    vocab_size: int = 1024
    pretrain_steps: int = 30
    seq_len: int = 128
    rows_per_batch: int = 8
    learning_rate: float = 3e-3

    def __post_init__(self) -> None:
        if self.pretrain_steps < 0:
            raise ValueError(f"pretrain_steps must be >= 0, got {self.pretrain_steps}")


@dataclass(frozen=True)
class FirstVersion:
    """What bootstrapping produced: the saved version's manifest and folder, and the pre-training run's metrics."""

    manifest: Manifest
    directory: Path
    pretraining: TrainMetrics | None


def demo_corpus(config: BootstrapConfig) -> dict[str, DomainCorpus]:
    """Every domain's train and held-out samples; the same seed always gives the same records."""
    return generate_corpus(
        CorpusConfig(seed=config.seed, train_samples=config.train_samples, heldout_samples=config.heldout_samples)
    )


def general_mix(corpus: Mapping[str, DomainCorpus]) -> list[Record]:
    """The pre-training mix: every domain's training samples, interleaved so no domain dominates a batch."""
    per_domain = [domain.mixed_records("train") for domain in corpus.values()]
    longest = max((len(records) for records in per_domain), default=0)
    return [records[index] for index in range(longest) for records in per_domain if index < len(records)]


def heldout_by_domain(
    corpus: Mapping[str, DomainCorpus], domains: Sequence[str] | None = None
) -> dict[str, list[Record]]:
    """Held-out records per domain (never seen in training), for the per-domain evaluation of every version."""
    names = list(domains) if domains is not None else list(corpus)
    return {name: corpus[name].records("heldout", "text") for name in names}


# (model, tokenizer, folder to write into) -> (files the version ships beside its weights, what its lineage says)
SafeguardFiles = Callable[[PreTrainedModel, Any, Path], tuple[dict[str, Path], dict[str, Any]]]


def build_first_version(
    corpus: Mapping[str, DomainCorpus],
    config: BootstrapConfig,
    directory: Path,
    *,
    version_id: str = "v1",
    safeguard_files: SafeguardFiles | None = None,
) -> FirstVersion:
    """Train the tokenizer on the general mix, build the model, pre-train all of it briefly, and save it (with the
    safeguard files `safeguard_files` writes for the trained weights, if given)."""
    mix = general_mix(corpus)
    tokenizer = train_bpe_tokenizer(record_texts(mix), BpeTokenizerConfig(vocab_size=config.vocab_size))
    model = build_model(config.preset, config.family, vocab_size=len(tokenizer), seed=config.seed)
    metrics = None
    if config.pretrain_steps:
        # A Tier-1 stand-in: the whole model trains (train_adapters trains whatever requires grad), so the edge
        # devices start from a model that already knows the domains a little and has something to refine.
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        metrics = train_adapters(
            model,
            tokenizer,
            mix,
            EdgeTrainConfig(
                seq_len=config.seq_len,
                rows_per_batch=config.rows_per_batch,
                learning_rate=config.learning_rate,
                warmup_steps=min(5, config.pretrain_steps),
                max_steps=config.pretrain_steps,
                seed=config.seed,
                precision="fp32",
            ),
        )
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    lineage: dict[str, Any] = {
        "datasets": [f"synthetic-general-mix-seed{config.seed}"],
        "runs": [f"demo-pretrain-{config.pretrain_steps}-steps"],
    }
    files: dict[str, Path] = {}
    scratch = directory.parent / f".{directory.name}.safeguards"
    try:
        if safeguard_files is not None:
            scratch.mkdir(parents=True)
            files, note = safeguard_files(model, tokenizer, scratch)
            if note:
                lineage["safeguards"] = note
        manifest = save_version(
            model,
            directory,
            version_id=version_id,
            parent_version=None,
            lineage=lineage,
            tokenizer=tokenizer,
            safeguard_files=files,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return FirstVersion(manifest=manifest, directory=directory, pretraining=metrics)
