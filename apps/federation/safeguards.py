"""Anti-forgetting safeguards across the control plane: the files a new version ships for training on it (its Fisher,
a replay set) and the `safeguards` section of a round's config that tells the devices to use them.

A version V ships the diagonal Fisher *of V's own weights*, estimated on the federation's protected domains: V is
what devices train on, so the curvature that says how much each of V's weights matters to those domains is the one
EWC needs to hold their adapters' ΔW back where it would cost them. The devices get numbers about weights, never the
records the numbers were estimated on.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, ValidationError
from torch import nn

from apps.federation.jobs import HELDOUT_FOLDER
from apps.registry.models import ModelVersion
from apps.registry.storage import artifact_path, artifact_root
from fednested.checkpoints.safeguards import (
    MAX_REPLAY_BYTES,
    REPLAY_FILE_NAME,
    ROUND_KEY,
    parse_round_safeguards,
    wants_fisher,
    wants_replay,
)
from fednested.config.training import SafeguardConfig
from fednested.data.jsonl import JsonlFormatError, read_jsonl
from fednested.data.records import Record
from fednested.training.safeguards import FISHER_FILE_NAME, estimate_fisher, save_fisher_file

# The Fisher's cost is one forward and backward per row: a million tokens is about ten minutes of the tiny preset on
# one CPU core (measured 0.6 ms a token), far more for a real model, and the aggregation waits for it.
MAX_FISHER_TOKENS = 1_000_000
FISHER_KEYS: dict[str, str] = {
    "domains": '"protected" (the promotion gate\'s protected domains) or a non-empty list of domain names',
    "max_tokens": f"an integer in [1, {MAX_FISHER_TOKENS}]: tokens read over all the domains together",
    "seq_len": "an integer in [8, 4096]: tokens per row",
    "heldout_dir": "the store folder of `<domain>.jsonl` sets to estimate on (default heldout)",
}


@dataclass(frozen=True)
class FisherSettings:
    """FEDNESTED_FISHER: which domains each new version's Fisher is estimated on, and at what cost."""

    domains: tuple[str, ...] | None  # None: the promotion gate's protected domains, read when a version is made
    max_tokens: int = 8192
    seq_len: int = 128
    heldout_dir: str = HELDOUT_FOLDER


def fisher_settings(raw: str | None = None) -> FisherSettings | None:
    """FEDNESTED_FISHER (or `raw`) parsed; None when the federation ships no Fisher. ImproperlyConfigured naming the
    key and what it must be."""
    text = (settings.FEDNESTED_FISHER if raw is None else raw).strip()
    if not text:
        return None
    where = "FEDNESTED_FISHER"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ImproperlyConfigured(f"{where}: not JSON ({error})") from None
    if not isinstance(data, dict) or "domains" not in data or set(data) - set(FISHER_KEYS):
        raise ImproperlyConfigured(f"{where}: give an object with 'domains' and optionally {sorted(FISHER_KEYS)[1:]}")
    domains = data["domains"]
    if domains == "protected":
        chosen = None
    elif isinstance(domains, list) and domains and all(isinstance(d, str) and d for d in domains):
        chosen = tuple(dict.fromkeys(domains))
    else:
        raise ImproperlyConfigured(f"{where}.domains: {domains!r}; give {FISHER_KEYS['domains']}")
    defaults = FisherSettings(domains=None)
    numbers: dict[str, int] = {}
    for key, low, high in (("max_tokens", 1, MAX_FISHER_TOKENS), ("seq_len", 8, 4096)):
        value = data.get(key, getattr(defaults, key))
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ImproperlyConfigured(f"{where}.{key}: {value!r}; give {FISHER_KEYS[key]}")
        numbers[key] = value
    heldout_dir = data.get("heldout_dir", HELDOUT_FOLDER)
    if not isinstance(heldout_dir, str) or not heldout_dir:
        raise ImproperlyConfigured(f"{where}.heldout_dir: {heldout_dir!r}; give {FISHER_KEYS['heldout_dir']}")
    return FisherSettings(domains=chosen, heldout_dir=heldout_dir, **numbers)


def fisher_records(fisher: FisherSettings) -> dict[str, list[Record]]:
    """Domain → held-out records the Fisher is estimated on; ImproperlyConfigured when a domain has no set."""
    try:
        directory = artifact_path(fisher.heldout_dir, artifact_root())
    except ValueError as error:
        raise ImproperlyConfigured(f"FEDNESTED_FISHER.heldout_dir: {error}") from None
    domains = fisher.domains
    if domains is None:
        # Imported here: the gate reads the federation's domains through apps.federation.jobs, which this module
        # must not be imported by.
        from apps.governance.gate import load_promotion_gate

        gate = load_promotion_gate()
        if gate is None:
            raise ImproperlyConfigured(
                'FEDNESTED_FISHER.domains is "protected" but no FEDNESTED_PROMOTION_GATE is configured: name the '
                "domains, or configure the gate"
            )
        # A gate that protects no domain leaves nothing to estimate on: the version ships no Fisher, and a round
        # asking for EWC on it is refused when it opens.
        domains = tuple(sorted(gate.protected))
    records: dict[str, list[Record]] = {}
    for domain in domains:
        path = directory / f"{domain}.jsonl"
        if not path.is_file():
            raise ImproperlyConfigured(
                f"FEDNESTED_FISHER: no held-out set {domain}.jsonl in the store's {fisher.heldout_dir!r} folder"
            )
        try:
            records[domain] = read_jsonl(path, strict=True).records
        except JsonlFormatError as error:
            raise ImproperlyConfigured(f"FEDNESTED_FISHER: {error}") from None
    return records


def replay_set_path(raw: str | None = None) -> Path | None:
    """FEDNESTED_REPLAY_SET checked (a JSONL of public or synthetic records, ≤ MAX_REPLAY_BYTES, every line a
    record); None when the federation provides none."""
    name = (settings.FEDNESTED_REPLAY_SET if raw is None else raw).strip()
    if not name:
        return None
    path = Path(name)
    if not path.is_file():
        raise ImproperlyConfigured(f"FEDNESTED_REPLAY_SET={name}: no such file")
    size = path.stat().st_size
    if size > MAX_REPLAY_BYTES:
        raise ImproperlyConfigured(
            f"FEDNESTED_REPLAY_SET={name}: {size} bytes, over the {MAX_REPLAY_BYTES} a replay set may have (it ships "
            "with every version): sample it down"
        )
    try:
        if not read_jsonl(path, strict=True).records:
            raise ImproperlyConfigured(f"FEDNESTED_REPLAY_SET={name}: holds no record")
    except JsonlFormatError as error:
        raise ImproperlyConfigured(f"FEDNESTED_REPLAY_SET: {error}") from None
    return path


def write_safeguard_files(
    model: nn.Module, tokenizer: Any, directory: Path, *, version_id: str
) -> tuple[dict[str, Path], dict[str, Any]]:
    """The safeguard files version `version_id` (whose weights `model` holds) ships, written under `directory`, and
    what its lineage records of them; both empty when the federation configures none. For save_version's
    `safeguard_files` and `lineage`."""
    files: dict[str, Path] = {}
    note: dict[str, Any] = {}
    fisher = fisher_settings()
    records = fisher_records(fisher) if fisher is not None else {}
    if fisher is not None and records:
        estimate = estimate_fisher(
            model, tokenizer, records, max_tokens=fisher.max_tokens, seq_len=fisher.seq_len, include="experts"
        )
        path = directory / FISHER_FILE_NAME
        save_fisher_file(path, estimate, version_id=version_id, domains=sorted(records))
        files[FISHER_FILE_NAME] = path
        note["fisher"] = {
            "file": FISHER_FILE_NAME,
            "of_weights": version_id,
            "domains": sorted(records),
            "heldout_dir": fisher.heldout_dir,
            "max_tokens": fisher.max_tokens,
            "tensors": len(estimate),
        }
    replay = replay_set_path()
    if replay is not None:
        files[REPLAY_FILE_NAME] = replay
        note["replay"] = {"file": REPLAY_FILE_NAME, "bytes": replay.stat().st_size}
    return files, note


# --- the round's `safeguards` section ---------------------------------------------------------------------------------


def check_round_safeguards(config: Mapping[str, Any], base_version: ModelVersion) -> SafeguardConfig | None:
    """What a round asks its devices to apply, refused (ValidationError on 'config') when a value is bad or when the
    base version lacks a file it needs: a device told to use EWC without a Fisher must not train at all."""
    try:
        safeguards = parse_round_safeguards(config)
    except ValueError as error:
        raise ValidationError({"config": str(error)}) from None
    if safeguards is None:
        return None
    shipped = set(base_version.artifacts.values_list("file_name", flat=True))
    if wants_fisher(safeguards) and FISHER_FILE_NAME not in shipped:
        raise ValidationError(
            {
                "config": f"{ROUND_KEY}.ewc_lambda is {safeguards.ewc_lambda} but version "
                f"{base_version.version_id!r} ships no {FISHER_FILE_NAME}: configure FEDNESTED_FISHER so new versions "
                "carry one, or open the round without EWC"
            }
        )
    if wants_replay(safeguards) and REPLAY_FILE_NAME not in shipped:
        raise ValidationError(
            {
                "config": f"{ROUND_KEY}.replay_fraction is {safeguards.replay_fraction} but version "
                f"{base_version.version_id!r} ships no {REPLAY_FILE_NAME}: configure FEDNESTED_REPLAY_SET, or open "
                "the round without replay"
            }
        )
    return safeguards
