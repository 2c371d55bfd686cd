"""Sequence packing: encoded records laid end to end in fixed-length rows, so a batch carries (almost) no padding.

Position ids restart at 0 at each record, which transformers reads as packed sequences: with `attention_mask=None`
its sdpa/eager mask becomes block-diagonal causal, so attention never crosses a record boundary. Targets are
shifted here (``targets[t]`` is the token to predict at t), and are `IGNORE_INDEX` at every boundary.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from fednested.data.encoding import IGNORE_INDEX, EncodedExample


@dataclass(frozen=True)
class PackedRow:
    """One row of `seq_len` tokens; `real_tokens` of them are record tokens, the rest (only ever at the end of the
    last row) padding."""

    input_ids: list[int]
    position_ids: list[int]
    targets: list[int]
    real_tokens: int


@dataclass(frozen=True)
class PackedBatch:
    """Rows stacked into tensors of shape [rows, seq_len]."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    real_tokens: int
    target_tokens: int

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(
            input_ids=self.input_ids.to(device, non_blocking=True),
            position_ids=self.position_ids.to(device, non_blocking=True),
            targets=self.targets.to(device, non_blocking=True),
            real_tokens=self.real_tokens,
            target_tokens=self.target_tokens,
        )


def _finish_row(input_ids: list[int], position_ids: list[int], labels: list[int], real: int) -> PackedRow:
    # Shift once here: the target at t is the label at t+1. Labels are IGNORE_INDEX at each segment start, so no
    # position is asked to predict the first token of the next record.
    targets = [*labels[1:], IGNORE_INDEX]
    return PackedRow(input_ids=input_ids, position_ids=position_ids, targets=targets, real_tokens=real)


def pack_examples(examples: Sequence[EncodedExample], seq_len: int, *, pad_id: int) -> list[PackedRow]:
    """Lay `examples` end to end in rows of `seq_len` tokens, in order.

    A record longer than the space left is split; its continuation starts the next row with fresh positions (its
    first token is not a target: the row holds none of its context). Only the last row is padded (label-free
    padding with its own positions, so no record attends to it).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one token of context and one target), got {seq_len}")
    rows: list[PackedRow] = []
    input_ids: list[int] = []
    position_ids: list[int] = []
    labels: list[int] = []
    for example in examples:
        offset = 0
        length = len(example.input_ids)
        while offset < length:
            space = seq_len - len(input_ids)
            chunk_ids = example.input_ids[offset : offset + space]
            chunk_labels = example.labels[offset : offset + space]
            chunk_labels = [IGNORE_INDEX, *chunk_labels[1:]]
            input_ids.extend(chunk_ids)
            labels.extend(chunk_labels)
            position_ids.extend(range(len(chunk_ids)))
            offset += len(chunk_ids)
            if len(input_ids) == seq_len:
                rows.append(_finish_row(input_ids, position_ids, labels, seq_len))
                input_ids, position_ids, labels = [], [], []
    if input_ids:
        real = len(input_ids)
        padding = seq_len - real
        input_ids.extend([pad_id] * padding)
        labels.extend([IGNORE_INDEX] * padding)
        position_ids.extend(range(padding))
        rows.append(_finish_row(input_ids, position_ids, labels, real))
    return rows


def pack_whole_examples(examples: Sequence[EncodedExample], seq_len: int, *, pad_id: int) -> list[PackedRow]:
    """Pack without ever splitting a record (for evaluation, where a split would drop context and bias the loss).

    First-fit over the records in order; each row is padded at its end. A record longer than `seq_len` gets a row
    of its own length, so the rows of one call can differ in length; `iter_batches` only stacks equal lengths.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one token of context and one target), got {seq_len}")
    open_rows: list[tuple[list[int], list[int], list[int]]] = []
    for example in examples:
        length = len(example.input_ids)
        row = next((row for row in open_rows if len(row[0]) + length <= seq_len), None)
        if row is None:
            row = ([], [], [])
            open_rows.append(row)
        row[0].extend(example.input_ids)
        row[1].extend(range(length))
        row[2].extend([IGNORE_INDEX, *example.labels[1:]])
    rows = []
    for input_ids, position_ids, labels in open_rows:
        real = len(input_ids)
        padding = max(seq_len - real, 0)
        input_ids.extend([pad_id] * padding)
        labels.extend([IGNORE_INDEX] * padding)
        position_ids.extend(range(padding))
        rows.append(_finish_row(input_ids, position_ids, labels, real))
    return rows


def collate_rows(rows: Sequence[PackedRow]) -> PackedBatch:
    """Stack rows into one batch of tensors."""
    if not rows:
        raise ValueError("cannot collate an empty list of rows")
    targets = torch.tensor([row.targets for row in rows], dtype=torch.long)
    return PackedBatch(
        input_ids=torch.tensor([row.input_ids for row in rows], dtype=torch.long),
        position_ids=torch.tensor([row.position_ids for row in rows], dtype=torch.long),
        targets=targets,
        real_tokens=sum(row.real_tokens for row in rows),
        target_tokens=int((targets != IGNORE_INDEX).sum()),
    )


def iter_batches(rows: Sequence[PackedRow], rows_per_batch: int) -> Iterator[PackedBatch]:
    """Consecutive batches of up to `rows_per_batch` rows of equal length; a batch is cut short (never padded with
    empty rows) at the end or where the row length changes."""
    if rows_per_batch < 1:
        raise ValueError(f"rows_per_batch must be at least 1, got {rows_per_batch}")
    pending: list[PackedRow] = []
    for row in rows:
        if pending and (len(pending) == rows_per_batch or len(row.input_ids) != len(pending[0].input_ids)):
            yield collate_rows(pending)
            pending = []
        pending.append(row)
    if pending:
        yield collate_rows(pending)
