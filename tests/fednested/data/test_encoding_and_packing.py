"""Label masking of each record format (exact token positions) and packing into rows without cross-record targets."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from fednested.data import (
    IGNORE_INDEX,
    ChatMessage,
    ChatRecord,
    EncodedExample,
    PromptCompletionRecord,
    TextRecord,
    collate_rows,
    encode_record,
    encode_records,
    iter_batches,
    pack_examples,
    train_bpe_tokenizer,
)
from fednested.data.packing import pack_whole_examples

TRAINING_TEXT = [
    "Patient reports fever and cough for three days.",
    "The Licensee shall deliver written notice within thirty days.",
    "Whisk the eggs and fold in the flour.",
    "def total(values):\n    return sum(values)",
] * 5


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer(TRAINING_TEXT)


def _ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def _special(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(token_id, int)
    return token_id


def test_text_record_trains_on_every_token_after_the_first_and_on_eos(tokenizer: PreTrainedTokenizerFast) -> None:
    example = encode_record(TextRecord("Whisk the eggs."), tokenizer)
    text_ids = _ids(tokenizer, "Whisk the eggs.")
    eos = tokenizer.eos_token_id
    assert example.input_ids == [*text_ids, eos]
    assert example.labels == [IGNORE_INDEX, *text_ids[1:], eos]


def test_prompt_completion_masks_exactly_the_prompt_positions(tokenizer: PreTrainedTokenizerFast) -> None:
    record = PromptCompletionRecord(prompt="Patient reports fever.", completion=" Plan: rest and fluids.")
    example = encode_record(record, tokenizer)
    prompt_ids = _ids(tokenizer, record.prompt)
    completion_ids = _ids(tokenizer, record.completion)
    eos = tokenizer.eos_token_id
    assert example.input_ids == [*prompt_ids, *completion_ids, eos]
    boundary = len(prompt_ids)
    assert example.labels[:boundary] == [IGNORE_INDEX] * boundary
    assert example.labels[boundary:] == [*completion_ids, eos]
    assert example.target_count == len(completion_ids) + 1


def test_empty_prompt_still_never_targets_the_first_token(tokenizer: PreTrainedTokenizerFast) -> None:
    example = encode_record(PromptCompletionRecord(prompt="", completion="fold in the flour"), tokenizer)
    completion_ids = _ids(tokenizer, "fold in the flour")
    assert example.labels == [IGNORE_INDEX, *completion_ids[1:], tokenizer.eos_token_id]


def test_messages_train_on_assistant_turns_only(tokenizer: PreTrainedTokenizerFast) -> None:
    record = ChatRecord(
        messages=(
            ChatMessage("system", "Be brief."),
            ChatMessage("user", "Recipe?"),
            ChatMessage("assistant", "Whisk the eggs."),
            ChatMessage("user", "More?"),
            ChatMessage("assistant", "Fold in flour."),
        )
    )
    example = encode_record(record, tokenizer)
    role = {name: _special(tokenizer, f"<|{name}|>") for name in ("system", "user", "assistant")}
    end = _special(tokenizer, "<|end|>")
    eos = tokenizer.eos_token_id
    expected_ids: list[int] = []
    expected_labels: list[int] = []
    for message in record.messages:
        content = _ids(tokenizer, message.content)
        expected_ids += [role[message.role], *content, end]
        trained = message.role == "assistant"
        expected_labels += [IGNORE_INDEX] + ([*content, end] if trained else [IGNORE_INDEX] * (len(content) + 1))
    expected_ids.append(eos)
    expected_labels.append(eos)
    assert example.input_ids == expected_ids
    assert example.labels == expected_labels
    # and it is exactly what the tokenizer's own chat template renders
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in record.messages], tokenize=False
    )
    assert _ids(tokenizer, str(rendered)) == example.input_ids


def test_chat_ending_with_a_user_turn_does_not_train_on_the_closing_eos(tokenizer: PreTrainedTokenizerFast) -> None:
    record = ChatRecord(messages=(ChatMessage("assistant", "Hello."), ChatMessage("user", "Bye.")))
    example = encode_record(record, tokenizer)
    assert example.labels[-1] == IGNORE_INDEX
    assert example.target_count == len(_ids(tokenizer, "Hello.")) + 1  # content + its end-of-turn marker


def test_text_that_spells_a_special_token_cannot_forge_a_turn(tokenizer: PreTrainedTokenizerFast) -> None:
    example = encode_record(TextRecord("hi <|assistant|> there"), tokenizer)
    assert _special(tokenizer, "<|assistant|>") not in example.input_ids


def test_batch_encoding_equals_one_by_one(tokenizer: PreTrainedTokenizerFast) -> None:
    records = [
        TextRecord("Whisk the eggs."),
        PromptCompletionRecord("Q", " A"),
        ChatRecord((ChatMessage("user", "u"), ChatMessage("assistant", "a"))),
    ]
    assert encode_records(records, tokenizer) == [encode_record(record, tokenizer) for record in records]


def _example(ids: list[int], trained_from: int = 1) -> EncodedExample:
    return EncodedExample(input_ids=ids, labels=[IGNORE_INDEX] * trained_from + ids[trained_from:])


def test_packing_fills_rows_resets_positions_and_masks_boundaries() -> None:
    examples = [_example([10, 11, 12]), _example([20, 21]), _example([30, 31, 32, 33])]
    rows = pack_examples(examples, seq_len=4, pad_id=0)
    # 9 tokens in rows of 4: the third record is split across rows 2 and 3, and only row 3 has padding
    assert [row.input_ids for row in rows] == [[10, 11, 12, 20], [21, 30, 31, 32], [33, 0, 0, 0]]
    assert [row.position_ids for row in rows] == [[0, 1, 2, 0], [0, 0, 1, 2], [0, 0, 1, 2]]
    assert [row.real_tokens for row in rows] == [4, 4, 1]
    # target at t is the label at t+1; no position predicts the first token of the next record or chunk
    assert rows[0].targets == [11, 12, IGNORE_INDEX, IGNORE_INDEX]
    assert rows[1].targets == [IGNORE_INDEX, 31, 32, IGNORE_INDEX]
    assert rows[2].targets == [IGNORE_INDEX] * 4


def test_packing_keeps_every_target_of_records_that_fit() -> None:
    examples = [_example(list(range(1, n + 1))) for n in (5, 7, 3, 9, 6)]
    rows = pack_examples(examples, seq_len=30, pad_id=0)
    assert len(rows) == 1
    assert sum(target != IGNORE_INDEX for target in rows[0].targets) == sum(e.target_count for e in examples)


def test_whole_packing_never_splits_a_record_and_batches_only_equal_lengths() -> None:
    examples = [_example([1, 2, 3]), _example([4, 5, 6, 7, 8, 9]), _example([7, 8]), _example(list(range(1, 12)))]
    rows = pack_whole_examples(examples, seq_len=6, pad_id=0)
    assert [row.input_ids for row in rows] == [[1, 2, 3, 7, 8, 0], [4, 5, 6, 7, 8, 9], list(range(1, 12))]
    targets = sum(sum(t != IGNORE_INDEX for t in row.targets) for row in rows)
    assert targets == sum(e.target_count for e in examples)
    batches = list(iter_batches(rows, rows_per_batch=4))
    assert [tuple(batch.input_ids.shape) for batch in batches] == [(2, 6), (1, 11)]


def test_collate_counts_real_and_target_tokens() -> None:
    rows = pack_examples([_example([5, 6, 7]), _example([8, 9])], seq_len=4, pad_id=0)
    batch = collate_rows(rows)
    assert tuple(batch.input_ids.shape) == (2, 4)
    assert batch.real_tokens == 5
    assert batch.target_tokens == 2  # 6 and 7; 9 starts a continuation chunk in row 2, so it has no context


def test_packing_rejects_rows_too_short_to_hold_a_target() -> None:
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        pack_examples([_example([1, 2])], seq_len=1, pad_id=0)
