"""An alias's API answer (`GET /api/v1/aliases/<name>/`), built once per change and kept in each server process.

Every device polls the champion; its answer (the version with its manifest and every artifact) is several KB of JSON
that takes five queries and a serializer walk to build. What the answer is made of changes only when an alias moves
or a version's status changes, so one cheap query (the fingerprint) decides on every request whether the kept
answer is still the one the database would give: every worker process sees a promotion at once, with no shared
cache to invalidate, and the ETag lets a polling device skip the body altogether (304).
"""

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rest_framework.utils.encoders import JSONEncoder

from apps.registry.models import Alias
from apps.registry.storage import artifact_root

# Aliases are few (champion, candidate, a handful an engineer names); a bound keeps a flood of names from growing it.
MAX_KEPT = 32

# What the answer shows that can change after registration (versions and their files are immutable): which aliases
# name the version and when they moved, who moved them, the version's status, its family's name; and where the
# store lies (artifact_uri is shown relative to it).
Fingerprint = tuple[str, tuple[tuple[Any, ...], ...]]


@dataclass(frozen=True)
class AliasRepresentation:
    """The serializer's data for one alias and its strong ETag (sha256 of the canonical JSON, quoted)."""

    data: Mapping[str, Any]
    etag: str


_kept: OrderedDict[str, tuple[Fingerprint, AliasRepresentation]] = OrderedDict()
_lock = threading.Lock()


def alias_fingerprint(name: str) -> Fingerprint | None:
    """One query over the aliases that share `name`'s version; None when no alias has that name."""
    rows = tuple(
        Alias.objects.filter(version__aliases__name=name)
        .order_by("name")
        .values_list(
            "name", "updated_at", "updated_by__username", "version_id", "version__status", "version__family__name"
        )
    )
    if not any(row[0] == name for row in rows):
        return None
    return str(artifact_root()), rows


def representation_etag(data: Mapping[str, Any]) -> str:
    canonical = json.dumps(data, cls=JSONEncoder, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return '"' + hashlib.sha256(canonical.encode("utf-8")).hexdigest() + '"'


def alias_representation(name: str, build: Callable[[], Mapping[str, Any]]) -> AliasRepresentation | None:
    """The answer for alias `name` (None: no such alias): the kept one while the fingerprint matches, else `build()`.

    A fresh answer is kept only when the fingerprint read before and after building it agree, so an alias moved
    while the answer was being built is never kept under the older fingerprint.
    """
    before = alias_fingerprint(name)
    if before is None:
        return None
    with _lock:
        kept = _kept.get(name)
    if kept is not None and kept[0] == before:
        return kept[1]
    data = build()
    representation = AliasRepresentation(data=data, etag=representation_etag(data))
    if alias_fingerprint(name) == before:
        with _lock:
            _kept[name] = (before, representation)
            _kept.move_to_end(name)
            while len(_kept) > MAX_KEPT:
                _kept.popitem(last=False)
    return representation
