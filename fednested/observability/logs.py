"""Log lines as JSON (one object per line, for servers) or as plain text (for people, `make demo`), both with the
request, device and round a line is about, and JSON with the trace and span ids that tie it to its trace.

The context lives in contextvars, set where it becomes known (the request-id middleware, the ingest loop, a job), so
every log call below picks it up without passing it around. Standard library only: a formatter and a filter.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

from fednested.observability.tracing import configured_service, current_ids

LogFormat = Literal["json", "text"]
LOG_FORMATS: tuple[LogFormat, ...] = ("json", "text")

# What a line is about, where it applies. Values are bounded by whoever sets them (request ids are validated by the
# middleware; client and round ids by their schemas).
request_id_var: ContextVar[str | None] = ContextVar("fednested_request_id", default=None)
client_id_var: ContextVar[str | None] = ContextVar("fednested_client_id", default=None)
round_id_var: ContextVar[str | None] = ContextVar("fednested_round_id", default=None)
CONTEXT_FIELDS = (("request_id", request_id_var), ("client_id", client_id_var), ("round_id", round_id_var))


@contextmanager
def log_context(
    *, request_id: str | None = None, client_id: str | None = None, round_id: str | None = None
) -> Iterator[None]:
    """Within the block, log lines name these (those given; the others keep their outer value)."""
    tokens = [
        (var, var.set(value))
        for var, value in ((request_id_var, request_id), (client_id_var, client_id), (round_id_var, round_id))
        if value is not None
    ]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def context_fields() -> dict[str, str]:
    """The trace, span, request, device and round of the current context, those that apply."""
    found: dict[str, str] = {}
    ids = current_ids()
    if ids is not None:
        found["trace_id"], found["span_id"] = ids
    for name, var in CONTEXT_FIELDS:
        value = var.get()
        if value:
            found[name] = value
    return found


class ContextFilter(logging.Filter):
    """Copies the context onto each record (as `record.fednested`), at the moment it is logged: a handler that
    formats later, in another thread, still shows the context of the call."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "fednested"):
            record.fednested = context_fields()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the context fields, the service,
    and the exception's traceback when there is one."""

    def __init__(self, service: str = "") -> None:
        # Empty: the service this process's tracing was set up for (settings are shared by every process).
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        service = self.service or configured_service()
        if service:
            line["service"] = service
        context = getattr(record, "fednested", None)
        line.update(context if isinstance(context, dict) else context_fields())
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: an argument that is no JSON type still yields a line, never a logging error.
        return json.dumps(line, ensure_ascii=False, default=str)


def logging_config(log_format: LogFormat, *, level: str, service: str = "") -> dict[str, Any]:
    """A `logging.config.dictConfig` dict: one handler on stderr, JSON or plain text, the context filter on both.

    Text keeps the bare message (what people and the demo read; daphne's access line stays `HTTP GET /x 200 [...]`).
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    formatter: dict[str, Any] = (
        {"()": "fednested.observability.logs.JsonFormatter", "service": service}
        if log_format == "json"
        else {"format": "%(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": "fednested.observability.logs.ContextFilter"}},
        "formatters": {"main": formatter},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "main", "filters": ["context"]}},
        "root": {"handlers": ["console"], "level": level},
    }
