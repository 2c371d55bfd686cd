"""One line per demo step, with a timestamp and the time since the demo started, flushed at once."""

import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol


class TextSink(Protocol):
    """Where progress goes: a text stream, or Django's OutputWrapper around one."""

    def write(self, text: str, /) -> Any: ...

    def flush(self) -> None: ...


@dataclass
class Progress:
    """Prints `[HH:MM:SS +seconds] message` lines to `stream`."""

    stream: TextSink = field(default_factory=lambda: sys.stdout)
    started: float = field(default_factory=time.monotonic)

    def step(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        self.stream.write(f"[{datetime.now():%H:%M:%S} +{elapsed:5.0f}s] {message}\n")
        self.stream.flush()

    def block(self, text: str) -> None:
        """Several lines (a table, the sign-in details) as they are, after a blank line."""
        self.stream.write("\n" + text.rstrip("\n") + "\n\n")
        self.stream.flush()
