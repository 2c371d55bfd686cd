"""What the REST API reads from a request, bounded: the JSON body parser (size, nesting, values), the serializer field
for JSON kept in a database column, and the timestamp filter of list queries. A body that breaks a bound is a 400
whose `code` says which (`too_large`, `too_deep`, `malformed_json`), never a 500 or an unbounded read.
"""

import codecs
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

import django_filters
from django import forms
from django.conf import settings
from django_filters.fields import IsoDateTimeField
from rest_framework import serializers
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

# Deeper than any document the API takes (a manifest's partition map is about 4 levels); far below Python's recursion
# limit, so neither the parser nor anything that walks the value later can overflow the stack.
MAX_JSON_DEPTH = 32
# What PostgreSQL's bigint and every JSON reader we use (Python, Go, librdkafka configs) hold exactly.
MAX_JSON_INT = 2**63 - 1


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        # 1e999 parses to inf, which no JSON column or later encoder can represent.
        raise ValueError(f"number {literal[:40]} is out of the range of a float")
    return value


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (numbers must be finite)")


def unstorable_text(text: str) -> str | None:
    """Why `text` cannot be stored (a NUL, which PostgreSQL text and jsonb refuse; an unpaired surrogate, which
    has no UTF-8 form), or None."""
    if "\x00" in text:
        return "holds a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "holds an unpaired UTF-16 surrogate"
    return None


def json_problem(value: Any, *, max_depth: int = MAX_JSON_DEPTH, max_int: int | None = None) -> tuple[str, str] | None:
    """(code, message) of the first bound `value` breaks — nesting deeper than `max_depth` (`too_deep`), a string
    or key that cannot be stored, an integer beyond ±`max_int` (`malformed_json`) — or None. Iterative, so a deep
    value cannot overflow the stack here either."""
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:
        item, path, depth = stack.pop()
        where = path or "the document"
        if isinstance(item, dict | list):
            if depth > max_depth:
                return "too_deep", f"{where} is nested more than {max_depth} levels deep"
            if isinstance(item, dict):
                for key, child in item.items():
                    problem = unstorable_text(key)
                    if problem is not None:
                        return "malformed_json", f"a key of {where} {problem}"
                    stack.append((child, f"{path}.{key[:40]}" if path else key[:40], depth + 1))
            else:
                stack.extend((child, f"{path}[{index}]", depth + 1) for index, child in enumerate(item))
        elif isinstance(item, str):
            problem = unstorable_text(item)
            if problem is not None:
                return "malformed_json", f"the string at {where} {problem}"
        elif max_int is not None and isinstance(item, int) and not isinstance(item, bool) and abs(item) > max_int:
            return "malformed_json", f"the integer at {where} is beyond ±{max_int}"
    return None


class BoundedJSONParser(JSONParser):
    """DRF's JSON parser with bounds: at most FEDNESTED_MAX_REQUEST_BYTES read, whatever the request says; nesting
    at most MAX_JSON_DEPTH; only finite numbers, integers of at most Python's 4300 digits; strings that can be stored.
    """

    def parse(
        self, stream: IO[Any], media_type: str | None = None, parser_context: Mapping[str, Any] | None = None
    ) -> Any:
        limit: int = settings.FEDNESTED_MAX_REQUEST_BYTES
        raw = _read_at_most(stream, limit + 1)
        if len(raw) > limit:
            raise ParseError(f"the JSON body is larger than {limit} bytes", code="too_large")
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            text = codecs.decode(raw, encoding)
        except (UnicodeDecodeError, LookupError) as error:
            raise ParseError(f"the body is not {encoding} text: {error}", code="malformed_json") from None
        try:
            value = json.loads(text, parse_float=_finite_float, parse_constant=_no_constants)
        except json.JSONDecodeError as error:
            raise ParseError(
                f"malformed JSON at line {error.lineno} column {error.colno}: {error.msg}", code="malformed_json"
            ) from None
        except RecursionError:
            raise ParseError(
                f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep", code="too_deep"
            ) from None
        except ValueError as error:
            # NaN/Infinity, 1e999, or an integer longer than Python converts (sys.get_int_max_str_digits()).
            raise ParseError(f"malformed JSON: {str(error)[:200]}", code="malformed_json") from None
        problem = json_problem(value)
        if problem is not None:
            raise ParseError(problem[1], code=problem[0])
        return value


def _read_at_most(stream: IO[Any] | None, size: int) -> bytes:
    """Up to `size` bytes of `stream`, however its `read` splits them."""
    if stream is None:
        return b""
    chunks: list[bytes] = []
    remaining = size
    while remaining > 0:
        chunk = stream.read(min(remaining, 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class StoredJSONField(serializers.JSONField):
    """A JSON value kept in a JSONField column: also its integers within ±MAX_JSON_INT (bigint, and what readers of
    the column hold exactly), besides the body parser's bounds (the value may come from a form or a test client)."""

    default_error_messages = {"unstorable": "{message}"}  # noqa: RUF012  # DRF's own convention: a class dict

    def to_internal_value(self, data: Any) -> Any:
        # First: DRF's own check serialises the value recursively, which a deep one would overflow.
        problem = json_problem(data, max_int=MAX_JSON_INT)
        if problem is not None:
            self.fail("unstorable", message=problem[1])
        return super().to_internal_value(data)


class UtcIsoDateTimeField(IsoDateTimeField):  # type: ignore[misc]  # django-filter ships no type hints
    """An ISO 8601 timestamp, in UTC: Python takes offsets up to ±23:59, PostgreSQL only up to ±15:59, and a date
    at the edge of the calendar may have no UTC form at all."""

    def to_python(self, value: Any) -> datetime | None:
        try:
            parsed: datetime | None = super().to_python(value)
            return parsed.astimezone(UTC) if parsed is not None else None
        except OverflowError:
            raise forms.ValidationError(f"{str(value)[:40]!r} is outside the range of dates", code="overflow") from None


class UtcIsoDateTimeFilter(django_filters.IsoDateTimeFilter):  # type: ignore[misc]  # django-filter ships no type hints
    """IsoDateTimeFilter whose value reaches the database in UTC (see UtcIsoDateTimeField)."""

    field_class = UtcIsoDateTimeField
