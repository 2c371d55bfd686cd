"""Training records in the three accepted shapes (plain text, prompt/completion, chat messages) and their validation.

A record is validated once, when it is parsed; everything downstream can rely on its fields being well formed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

ChatRole: TypeAlias = Literal["system", "user", "assistant"]
CHAT_ROLES: tuple[ChatRole, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class TextRecord:
    """Free text; the loss covers every token."""

    text: str


@dataclass(frozen=True)
class PromptCompletionRecord:
    """A prompt and its completion; the loss covers the completion only."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation."""

    role: ChatRole
    content: str


@dataclass(frozen=True)
class ChatRecord:
    """A conversation; the loss covers the assistant turns only."""

    messages: tuple[ChatMessage, ...]


Record: TypeAlias = TextRecord | PromptCompletionRecord | ChatRecord
RecordFormat: TypeAlias = Literal["text", "prompt_completion", "messages"]
RECORD_FORMATS: tuple[RecordFormat, ...] = ("text", "prompt_completion", "messages")


class RecordError(ValueError):
    """A JSON value is not a valid record; `field` names the offending field (dotted path) when there is one."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        self.reason = message
        super().__init__(f"field {field!r}: {message}" if field else message)


def _require_str(obj: dict[str, Any], key: str, *, allow_empty: bool, field: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(f"expected a string, got {type(value).__name__}", field=field)
    if not allow_empty and not value.strip():
        raise RecordError("is empty", field=field)
    return value


def _parse_messages(value: Any) -> ChatRecord:
    if not isinstance(value, list):
        raise RecordError(f"expected a list of messages, got {type(value).__name__}", field="messages")
    if not value:
        raise RecordError("is an empty list", field="messages")
    messages = []
    for index, item in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise RecordError(f"expected an object with 'role' and 'content', got {type(item).__name__}", field=where)
        for key in ("role", "content"):
            if key not in item:
                raise RecordError("is missing", field=f"{where}.{key}")
        role = item["role"]
        if role not in CHAT_ROLES:
            raise RecordError(f"must be one of {', '.join(CHAT_ROLES)}; got {role!r}", field=f"{where}.role")
        content = _require_str(item, "content", allow_empty=False, field=f"{where}.content")
        messages.append(ChatMessage(role=role, content=content))
    if not any(message.role == "assistant" for message in messages):
        # Without an assistant turn there are no tokens to learn from; accepting it would silently train on nothing.
        raise RecordError("has no 'assistant' message, so there is nothing to learn from", field="messages")
    return ChatRecord(messages=tuple(messages))


def parse_record(value: Any) -> Record:
    """Validate one decoded JSON value and return the record it describes.

    The shape is chosen by its keys: ``messages``, ``prompt``/``completion`` or ``text``; keys beyond those (ids,
    metadata) are ignored. Raises `RecordError` naming the field that is wrong.
    """
    if not isinstance(value, dict):
        raise RecordError(f"expected a JSON object, got {type(value).__name__}")
    shapes = [name for name, keys in _SHAPE_KEYS.items() if any(key in value for key in keys)]
    if not shapes:
        raise RecordError("has none of the fields 'text', 'prompt'/'completion' or 'messages'")
    if len(shapes) > 1:
        raise RecordError(f"mixes the fields of several record formats ({', '.join(shapes)}); use exactly one")
    shape = shapes[0]
    if shape == "messages":
        return _parse_messages(value["messages"])
    if shape == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in value:
                raise RecordError("is missing", field=key)
        # An empty prompt is legitimate (unconditional completion); an empty completion has nothing to learn.
        prompt = _require_str(value, "prompt", allow_empty=True, field="prompt")
        completion = _require_str(value, "completion", allow_empty=False, field="completion")
        return PromptCompletionRecord(prompt=prompt, completion=completion)
    return TextRecord(text=_require_str(value, "text", allow_empty=False, field="text"))


_SHAPE_KEYS: dict[RecordFormat, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
}


def record_format(record: Record) -> RecordFormat:
    """The format name of a record, as used in file names and reports."""
    if isinstance(record, TextRecord):
        return "text"
    if isinstance(record, PromptCompletionRecord):
        return "prompt_completion"
    return "messages"


def record_to_json(record: Record) -> dict[str, Any]:
    """The JSON object that `parse_record` turns back into `record`."""
    if isinstance(record, TextRecord):
        return {"text": record.text}
    if isinstance(record, PromptCompletionRecord):
        return {"prompt": record.prompt, "completion": record.completion}
    return {"messages": [{"role": message.role, "content": message.content} for message in record.messages]}
