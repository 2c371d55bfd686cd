"""JSONL parsing: each record format, each kind of bad line, blank lines, strict mode and the write/read round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fednested.data import (
    ChatMessage,
    ChatRecord,
    JsonlFormatError,
    PromptCompletionRecord,
    RecordError,
    TextRecord,
    iter_jsonl,
    parse_record,
    read_jsonl,
    read_jsonl_files,
    write_jsonl,
)


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return path


def test_each_record_format_parses_to_its_type(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "mixed.jsonl",
        [
            json.dumps({"text": "hello world", "id": 7}),
            json.dumps({"prompt": "Q: 2+2?", "completion": " 4"}),
            json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
        ],
    )
    result = read_jsonl(path)
    assert result.records == [
        TextRecord(text="hello world"),
        PromptCompletionRecord(prompt="Q: 2+2?", completion=" 4"),
        ChatRecord(messages=(ChatMessage("user", "hi"), ChatMessage("assistant", "hello"))),
    ]
    assert result.bad_lines == []
    assert result.lines_read == 3


# Each bad case with the reason fragment the report must contain: the user must learn what to fix.
BAD_LINES = [
    ('{"text": "unterminated', "invalid JSON"),
    ("[1, 2, 3]", "expected a JSON object, got list"),
    ('"just a string"', "expected a JSON object, got str"),
    ('{"text": 42}', "field 'text': expected a string, got int"),
    ('{"text": "   "}', "field 'text': is empty"),
    ('{"prompt": "only a prompt"}', "field 'completion': is missing"),
    ('{"completion": "only a completion"}', "field 'prompt': is missing"),
    ('{"prompt": "p", "completion": ["c"]}', "field 'completion': expected a string, got list"),
    ('{"prompt": "p", "completion": ""}', "field 'completion': is empty"),
    ('{"messages": []}', "field 'messages': is an empty list"),
    ('{"messages": "hi"}', "field 'messages': expected a list of messages, got str"),
    ('{"messages": [{"role": "user"}]}', "field 'messages[0].content': is missing"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "field 'messages[0].role': must be one of"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "has no 'assistant' message"),
    ('{"messages": [{"role": "assistant", "content": 3}]}', "field 'messages[0].content': expected a string, got int"),
    ('{"text": "a", "prompt": "b", "completion": "c"}', "mixes the fields of several record formats"),
    ('{"id": 1, "body": "no known field"}', "has none of the fields"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES)
def test_bad_line_is_skipped_counted_and_reported_with_file_and_line(tmp_path: Path, line: str, reason: str) -> None:
    path = _write_lines(tmp_path / "data.jsonl", [json.dumps({"text": "good one"}), line, json.dumps({"text": "two"})])
    result = read_jsonl(path)
    # the valid lines around the bad one survive
    assert result.records == [TextRecord("good one"), TextRecord("two")]
    assert result.skipped == 1
    bad = result.bad_lines[0]
    assert (bad.path, bad.line_number) == (str(path), 2)
    assert reason in bad.reason
    assert str(bad).startswith(f"{path}:2: ")


@pytest.mark.parametrize(("line", "reason"), BAD_LINES)
def test_strict_mode_raises_on_the_first_bad_line_with_file_and_line(tmp_path: Path, line: str, reason: str) -> None:
    path = _write_lines(tmp_path / "data.jsonl", [json.dumps({"text": "good"}), json.dumps({"text": "ok"}), line])
    with pytest.raises(JsonlFormatError, match=rf"^{path}:3: ") as raised:
        read_jsonl(path, strict=True)
    assert reason in str(raised.value)
    assert raised.value.bad_line.line_number == 3


def test_invalid_utf8_is_a_bad_line_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "\xff\xfe broken"}\n{"text": "also fine"}\n')
    result = read_jsonl(path)
    assert [record for record in result.records] == [TextRecord("fine"), TextRecord("also fine")]
    assert result.bad_lines[0].line_number == 2
    assert "not valid UTF-8" in result.bad_lines[0].reason


def test_blank_lines_are_skipped_and_counted_but_are_not_errors_even_when_strict(tmp_path: Path) -> None:
    path = tmp_path / "gaps.jsonl"
    path.write_text('\n{"text": "a"}\n   \n\t\n{"text": "b"}\n\n', encoding="utf-8")
    for strict in (False, True):
        result = read_jsonl(path, strict=strict)
        assert result.records == [TextRecord("a"), TextRecord("b")]
        assert result.blank_lines == 4
        assert result.bad_lines == []


def test_line_numbers_count_blank_lines_and_crlf_endings(tmp_path: Path) -> None:
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b'{"text": "a"}\r\n\r\n{"text": 1}\r\n')
    result = read_jsonl(path)
    assert result.records == [TextRecord("a")]
    assert result.bad_lines[0].line_number == 3


def test_byte_order_mark_on_the_first_line_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "from an editor"}\n')
    assert read_jsonl(path).records == [TextRecord("from an editor")]


def test_iter_jsonl_streams_records_and_bad_lines_in_order(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "s.jsonl", ['{"text": "a"}', "{oops", '{"text": "b"}'])
    items = list(iter_jsonl(path))
    assert items[0] == TextRecord("a")
    assert not isinstance(items[1], TextRecord)
    assert items[1].line_number == 2  # type: ignore[union-attr]
    assert items[2] == TextRecord("b")
    with pytest.raises(JsonlFormatError, match=r":2: invalid JSON"):
        list(iter_jsonl(path, strict=True))


def test_write_then_read_round_trips_every_format_and_unicode(tmp_path: Path) -> None:
    records = [
        TextRecord("naïve café — 東京\nsecond line"),
        PromptCompletionRecord(prompt="", completion="unconditional"),
        ChatRecord(
            messages=(
                ChatMessage("system", "be brief"),
                ChatMessage("user", 'quote "this"'),
                ChatMessage("assistant", "done"),
            )
        ),
    ]
    path = tmp_path / "nested" / "out.jsonl"
    assert write_jsonl(path, records) == 3
    assert read_jsonl(path, strict=True).records == records


def test_read_several_files_keeps_order_and_each_files_own_line_numbers(tmp_path: Path) -> None:
    first = _write_lines(tmp_path / "a.jsonl", ['{"text": "1"}', "nope"])
    second = _write_lines(tmp_path / "b.jsonl", ["nope", '{"text": "2"}'])
    result = read_jsonl_files([first, second])
    assert result.records == [TextRecord("1"), TextRecord("2")]
    assert [(bad.path, bad.line_number) for bad in result.bad_lines] == [(str(first), 2), (str(second), 1)]


def test_parse_record_error_names_the_field() -> None:
    with pytest.raises(RecordError) as raised:
        parse_record({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]})
    assert raised.value.field == "messages[1].content"
