"""Hook for PII scrubbing of outbound metadata (a later issue plugs a local Presidio-style scrubber in here).

The sidecar calls the scrubber before its own checks; the policy still refuses whatever the scrubber lets through
that is not allow-listed, so a scrubber can only remove data, never widen what leaves the device."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class MetadataScrubber(Protocol):
    """Returns the metadata with personal data removed or masked; must not add fields."""

    def __call__(self, kind: str, metadata: Mapping[str, Any]) -> dict[str, Any]: ...
