"""Turning records into token ids and loss labels: which tokens the model learns from in each record format.

Labels follow the transformers convention (`labels[i]` is the token at position i, or `IGNORE_INDEX` when position i
is not a target). The first token of a record is never a target: nothing in the record precedes it, and when
records are packed into one row this keeps a record from being predicted from the one before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from fednested.data.records import ChatRecord, PromptCompletionRecord, Record, TextRecord
from fednested.data.tokenizer import END_OF_TURN_TOKEN, ROLE_TOKENS

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one record and, position by position, the label to learn there (or `IGNORE_INDEX`)."""

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length")

    @property
    def target_count(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


class _Pieces:
    """Collects (text, trained) segments of every record so the tokenizer runs once over all of them (batching is
    several times faster than one call per string)."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.layout: list[list[tuple[int | list[int], bool]]] = []

    def text(self, record_index: int, text: str, trained: bool) -> None:
        self.layout[record_index].append((len(self.texts), trained))
        self.texts.append(text)

    def ids(self, record_index: int, token_ids: list[int], trained: bool) -> None:
        self.layout[record_index].append((token_ids, trained))


def _marker_ids(tokenizer: PreTrainedTokenizerBase, token: str) -> list[int]:
    """A role or end-of-turn marker: one special token when the vocabulary has it, else the marker spelled as text."""
    vocab = tokenizer.get_vocab()
    if token in vocab:
        return [vocab[token]]
    ids: list[int] = tokenizer(token, add_special_tokens=False)["input_ids"]
    return ids


def encode_records(records: Sequence[Record], tokenizer: PreTrainedTokenizerBase) -> list[EncodedExample]:
    """Encode each record into ids and labels.

    - text: every token is a target, then end-of-text.
    - prompt/completion: the prompt is context only; the completion and the end-of-text token are targets.
    - messages: ``<|role|>content<|end|>`` per turn; assistant contents and their end-of-turn markers are targets,
      and so is the closing end-of-text when the last turn is the assistant's.

    Text inside records is tokenized with special-token splitting, so a record that contains ``<|assistant|>``
    cannot forge a turn. A tokenizer with a BOS token gets it prepended (as context).
    """
    eos_id = tokenizer.eos_token_id
    if not isinstance(eos_id, int):
        raise ValueError("the tokenizer has no end-of-text (eos) token; records cannot be delimited")
    bos_id = tokenizer.bos_token_id
    prefix = [bos_id] if isinstance(bos_id, int) else []
    role_ids = {role: _marker_ids(tokenizer, token) for role, token in ROLE_TOKENS.items()}
    end_ids = _marker_ids(tokenizer, END_OF_TURN_TOKEN)

    pieces = _Pieces()
    for index, record in enumerate(records):
        pieces.layout.append([])
        if prefix:
            pieces.ids(index, prefix, trained=False)
        if isinstance(record, TextRecord):
            pieces.text(index, record.text, trained=True)
            pieces.ids(index, [eos_id], trained=True)
        elif isinstance(record, PromptCompletionRecord):
            if record.prompt:
                pieces.text(index, record.prompt, trained=False)
            pieces.text(index, record.completion, trained=True)
            pieces.ids(index, [eos_id], trained=True)
        elif isinstance(record, ChatRecord):
            for message in record.messages:
                trained = message.role == "assistant"
                pieces.ids(index, role_ids[message.role], trained=False)
                pieces.text(index, message.content, trained=trained)
                pieces.ids(index, end_ids, trained=trained)
            pieces.ids(index, [eos_id], trained=record.messages[-1].role == "assistant")
        else:  # pragma: no cover - the Record union is closed; this guards against a new format being half-added
            raise TypeError(f"not a record: {type(record).__name__}")

    tokenized: list[list[int]] = (
        tokenizer(pieces.texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if pieces.texts
        else []
    )
    examples = []
    for layout in pieces.layout:
        input_ids: list[int] = []
        labels: list[int] = []
        for piece, trained in layout:
            ids = tokenized[piece] if isinstance(piece, int) else piece
            input_ids.extend(ids)
            labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
        labels[0] = IGNORE_INDEX
        examples.append(EncodedExample(input_ids=input_ids, labels=labels))
    return examples


def encode_record(record: Record, tokenizer: PreTrainedTokenizerBase) -> EncodedExample:
    """Encode one record; see `encode_records`."""
    return encode_records([record], tokenizer)[0]
