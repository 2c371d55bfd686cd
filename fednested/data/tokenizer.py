"""Tokenizers: a byte-level BPE trained with the `tokenizers` library, saved beside a checkpoint and loaded from it.

Special tokens cover padding, end of text and the chat roles, so every record format encodes without guesswork.
A model directory that ships its own tokenizer is loaded as is (`load_tokenizer`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from fednested.data.records import ChatRecord, PromptCompletionRecord, Record, TextRecord

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_TURN_TOKEN = "<|end|>"
ROLE_TOKENS: dict[str, str] = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, EOS_TOKEN, *ROLE_TOKENS.values(), END_OF_TURN_TOKEN)

# The same layout `fednested.data.encoding` produces, so `apply_chat_template` and our encoder agree token for token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ '<|endoftext|>' }}{% endif %}"
)


@dataclass(frozen=True)
class BpeTokenizerConfig:
    """How to train the byte-level BPE (byte-level: any UTF-8 text encodes, nothing maps to an unknown token)."""

    vocab_size: int = 2048
    min_frequency: int = 2

    def __post_init__(self) -> None:
        # 256 byte symbols plus the special tokens must fit, or the trainer silently returns a byte-only vocabulary.
        minimum = 256 + len(SPECIAL_TOKENS)
        if self.vocab_size < minimum:
            raise ValueError(
                f"vocab_size must be at least {minimum} (256 bytes + special tokens), got {self.vocab_size}"
            )
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be at least 1, got {self.min_frequency}")


def record_texts(records: Iterable[Record]) -> Iterator[str]:
    """Every piece of text in `records` (texts, prompts, completions, message contents), for tokenizer training."""
    for record in records:
        if isinstance(record, TextRecord):
            yield record.text
        elif isinstance(record, PromptCompletionRecord):
            if record.prompt:
                yield record.prompt
            yield record.completion
        elif isinstance(record, ChatRecord):
            for message in record.messages:
                yield message.content


def train_bpe_tokenizer(texts: Iterable[str], config: BpeTokenizerConfig | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it as a transformers tokenizer with our special tokens."""
    config = config or BpeTokenizerConfig()
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        # Seeding the full byte alphabet keeps unseen characters encodable as bytes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]  # transformers leaves __init__ untyped
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[*ROLE_TOKENS.values(), END_OF_TURN_TOKEN],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike[str]) -> list[Path]:
    """Write the tokenizer files into `directory` (beside a checkpoint's weights); returns the files written."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    written = tokenizer.save_pretrained(os.fspath(directory))
    return sorted(Path(name) for name in written if Path(name).is_file())


def load_tokenizer(directory: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load the tokenizer stored in a model or checkpoint directory; never reaches out to a hub."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FileNotFoundError(
            f"{path} holds no tokenizer (expected tokenizer.json or tokenizer_config.json); "
            "save one with fednested.data.save_tokenizer"
        )
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
    return tokenizer
