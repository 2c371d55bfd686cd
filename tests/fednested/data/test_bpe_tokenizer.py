"""BPE tokenizer: training, special tokens, save/load round trip beside a checkpoint, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fednested.data import (
    SPECIAL_TOKENS,
    BpeTokenizerConfig,
    CorpusConfig,
    TextRecord,
    encode_records,
    generate_corpus,
    load_tokenizer,
    record_texts,
    save_tokenizer,
    train_bpe_tokenizer,
)


def _texts() -> list[str]:
    corpus = generate_corpus(CorpusConfig(seed=3, train_samples=40, heldout_samples=5))
    return [text for domain in corpus.values() for text in record_texts(domain.mixed_records("train"))]


def test_trained_tokenizer_has_the_special_tokens_and_requested_size() -> None:
    tokenizer = train_bpe_tokenizer(_texts(), BpeTokenizerConfig(vocab_size=600))
    vocab = tokenizer.get_vocab()
    assert len(tokenizer) == 600
    for token in SPECIAL_TOKENS:
        assert token in vocab
    assert tokenizer.convert_ids_to_tokens(tokenizer.pad_token_id) == "<|pad|>"
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == "<|endoftext|>"
    # merges were learned: common domain words are single tokens, not bytes
    assert len(tokenizer("Patient", add_special_tokens=False)["input_ids"]) == 1


def test_byte_level_bpe_encodes_unseen_characters_losslessly() -> None:
    tokenizer = train_bpe_tokenizer(_texts(), BpeTokenizerConfig(vocab_size=400))
    text = "naïve 東京 🚗 ∑"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_training_twice_on_the_same_texts_gives_the_same_vocabulary() -> None:
    texts = _texts()
    first = train_bpe_tokenizer(texts, BpeTokenizerConfig(vocab_size=500))
    second = train_bpe_tokenizer(texts, BpeTokenizerConfig(vocab_size=500))
    assert first.get_vocab() == second.get_vocab()


def test_save_and_load_round_trip_gives_identical_encodings(tmp_path: Path) -> None:
    texts = _texts()
    tokenizer = train_bpe_tokenizer(texts, BpeTokenizerConfig(vocab_size=500))
    written = save_tokenizer(tokenizer, tmp_path / "version-1")
    assert {path.name for path in written} >= {"tokenizer.json", "tokenizer_config.json"}
    loaded = load_tokenizer(tmp_path / "version-1")
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    records = [TextRecord(text) for text in texts[:50]]
    assert encode_records(records, loaded) == encode_records(records, tokenizer)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert loaded.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(
        messages, tokenize=False
    )


def test_load_from_missing_or_empty_directory_says_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "empty")


def test_vocab_too_small_for_bytes_and_special_tokens_is_refused() -> None:
    with pytest.raises(ValueError, match="vocab_size must be at least 262"):
        BpeTokenizerConfig(vocab_size=100)
