"""The synthetic corpus: determinism, disjoint splits, all three formats on disk, and clearly separable domains."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

from fednested.data import (
    DOMAINS,
    RECORD_FORMATS,
    ChatRecord,
    CorpusConfig,
    PromptCompletionRecord,
    TextRecord,
    generate_corpus,
    read_jsonl,
    write_corpus,
)


def test_same_seed_gives_identical_records_and_another_seed_different_ones() -> None:
    config = CorpusConfig(seed=11, train_samples=30, heldout_samples=10)
    first, second = generate_corpus(config), generate_corpus(config)
    other = generate_corpus(CorpusConfig(seed=12, train_samples=30, heldout_samples=10))
    for domain in DOMAINS:
        for record_format in RECORD_FORMATS:
            assert first[domain].records("train", record_format) == second[domain].records("train", record_format)
            assert first[domain].records("heldout", record_format) == second[domain].records("heldout", record_format)
        assert first[domain].records("train") != other[domain].records("train")


def test_there_are_at_least_four_domains_and_heldout_never_repeats_train() -> None:
    corpus = generate_corpus(CorpusConfig(seed=0, train_samples=150, heldout_samples=40))
    assert len(corpus) >= 4
    for domain_corpus in corpus.values():
        train = {record.text for record in domain_corpus.records("train", "text") if isinstance(record, TextRecord)}
        heldout = [record for record in domain_corpus.records("heldout", "text") if isinstance(record, TextRecord)]
        assert len(heldout) == 40
        assert not train & {record.text for record in heldout}


def test_formats_carry_the_same_sample() -> None:
    domain = generate_corpus(CorpusConfig(seed=1, train_samples=3, heldout_samples=1))["legal"]
    text = domain.records("train", "text")[0]
    pair = domain.records("train", "prompt_completion")[0]
    chat = domain.records("train", "messages")[0]
    assert isinstance(text, TextRecord)
    assert isinstance(pair, PromptCompletionRecord)
    assert isinstance(chat, ChatRecord)
    assert text.text == pair.prompt + pair.completion
    assert chat.messages[-1].role == "assistant"
    assert chat.messages[-1].content == pair.completion.lstrip(" ")
    mixed = domain.mixed_records("train")
    assert [type(record) for record in mixed] == [TextRecord, PromptCompletionRecord, ChatRecord]


def test_write_corpus_writes_every_domain_split_and_format_as_valid_jsonl(tmp_path: Path) -> None:
    corpus = generate_corpus(CorpusConfig(seed=5, train_samples=12, heldout_samples=4))
    paths = write_corpus(corpus, tmp_path)
    assert len(paths) == len(DOMAINS) * 2 * len(RECORD_FORMATS)
    assert (tmp_path / "medical" / "heldout.messages.jsonl") in paths
    for path in paths:
        domain, name = path.parent.name, path.name
        split, record_format = name.split(".")[:2]
        result = read_jsonl(path, strict=True)
        assert result.records == corpus[domain].records(split, record_format)  # type: ignore[arg-type]


def _bigram_model(texts: list[str]) -> tuple[Counter[str], Counter[str]]:
    bigrams: Counter[str] = Counter()
    unigrams: Counter[str] = Counter()
    for text in texts:
        unigrams.update(text)
        bigrams.update(text[index : index + 2] for index in range(len(text) - 1))
    return bigrams, unigrams


def _cross_entropy(model: tuple[Counter[str], Counter[str]], texts: list[str], alphabet: int = 256) -> float:
    bigrams, unigrams = model
    total, count = 0.0, 0
    for text in texts:
        for index in range(len(text) - 1):
            # add-one smoothed character bigram: enough to show the domains have different statistics
            probability = (bigrams[text[index : index + 2]] + 1) / (unigrams[text[index]] + alphabet)
            total -= math.log(probability)
            count += 1
    return total / count


def test_domains_are_separable_a_bigram_model_fits_its_own_domain_best() -> None:
    corpus = generate_corpus(CorpusConfig(seed=2, train_samples=120, heldout_samples=30))

    def texts(domain: str, split: str) -> list[str]:
        return [record.text for record in corpus[domain].records(split, "text") if isinstance(record, TextRecord)]  # type: ignore[arg-type]

    for trained_on in DOMAINS:
        model = _bigram_model(texts(trained_on, "train"))
        own = _cross_entropy(model, texts(trained_on, "heldout"))
        for other in DOMAINS:
            if other != trained_on:
                # a clear margin, not a coin flip: at least 0.3 nats per character
                assert _cross_entropy(model, texts(other, "heldout")) > own + 0.3, (trained_on, other)


def test_unknown_domain_is_refused_with_the_known_list() -> None:
    with pytest.raises(ValueError, match="unknown corpus domains"):
        CorpusConfig(domains=("medical", "astrology"))
