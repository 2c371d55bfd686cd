"""The promotion gate: per-domain limits on how much worse a candidate may be than its parent and the champion.

The thresholds are the federation's config, a JSON file named by FEDNESTED_PROMOTION_GATE (there is no Federation
model; a deployment's federation is its settings, and a threshold change is reviewed and deployed like any other):

    {"protected": {"code": {"max_increase_nats": 0.05, "max_increase_fraction": 0.02,
                            "against": ["parent", "champion"]}}}

Each protected domain needs at least one limit; `against` defaults to both references. The file is read and checked
whenever the gate is consulted, so an edit takes effect at once and a bad edit is refused with the file, the key and
what to do — and, while it is bad, approval fails closed. `gate_verdict` is what approve_version, the API and the
console ask; `check_thresholds` is the pure rule under it.
"""

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from apps.federation.jobs import HELDOUT_FOLDER, heldout_files
from apps.registry.choices import CHAMPION_ALIAS
from apps.registry.models import Alias, ForgettingReport, ModelVersion, VersionEvaluation
from apps.registry.storage import artifact_root

REFERENCES = ("parent", "champion")
LIMITS = ("max_increase_nats", "max_increase_fraction")
# A thresholds file is a few lines per domain; anything near this is not one.
MAX_CONFIG_BYTES = 64 * 1024


class GateConfigError(ImproperlyConfigured):
    """The thresholds file is unreadable or wrong; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class DomainThreshold:
    """How much worse (in nats, and as a fraction of the reference loss) a candidate may be on one domain."""

    max_increase_nats: float | None = field(default=None, metadata={"help": "Largest allowed loss − reference loss."})
    max_increase_fraction: float | None = field(
        default=None, metadata={"help": "Largest allowed (loss − reference) ÷ reference, e.g. 0.02 for 2 %."}
    )
    against: tuple[str, ...] = field(default=REFERENCES, metadata={"help": "References: 'parent', 'champion'."})


@dataclass(frozen=True)
class PromotionGate:
    """The protected domains and their thresholds; `source` names where they were read from."""

    protected: dict[str, DomainThreshold]
    source: str


@dataclass(frozen=True)
class Breach:
    """One threshold a candidate is past: on `domain`, against `against` (version `reference`), limit `limit`."""

    domain: str
    against: str
    reference: str | None
    limit: str
    allowed: float | None
    loss: float | None
    reference_loss: float | None

    @property
    def change(self) -> float | None:
        return None if self.loss is None or self.reference_loss is None else self.loss - self.reference_loss

    @property
    def relative_change(self) -> float | None:
        change = self.change
        return None if change is None or not self.reference_loss else change / self.reference_loss

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What an override is granted for: the same domain, reference version and limit."""
        return (self.domain, self.against, self.reference or "", self.limit)

    def describe(self) -> str:
        if self.limit == "not_evaluated":
            return f"{self.domain}: the candidate has no held-out loss on this protected domain"
        if self.limit == "no_reference_score":
            return f"{self.domain}: {self.against} {self.reference} has no loss on the same held-out set to compare"
        if self.limit == "max_increase_fraction":
            return (
                f"{self.domain}: loss {self.loss:.4f} vs {self.against} {self.reference} {self.reference_loss:.4f} "
                f"is {(self.relative_change or 0.0) * 100:+.2f} %, over the {self.allowed:.2%} allowed"
            )
        return (
            f"{self.domain}: loss {self.loss:.4f} vs {self.against} {self.reference} {self.reference_loss:.4f} "
            f"is {self.change:+.4f} nats, over the {self.allowed:.4f} allowed"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "against": self.against,
            "reference": self.reference,
            "limit": self.limit,
            "allowed": self.allowed,
            "loss": self.loss,
            "reference_loss": self.reference_loss,
            "change": self.change,
            "relative_change": self.relative_change,
            "message": self.describe(),
        }


def _limit(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise GateConfigError(f"{where}: {value!r} is not a limit; give a finite number ≥ 0")
    return float(value)


def parse_gate(data: Any, *, source: str, known_domains: Sequence[str]) -> PromotionGate:
    """The gate described by `data` (the parsed JSON), refusing unknown keys and domains the federation lacks."""
    if not isinstance(data, dict) or set(data) - {"protected"}:
        raise GateConfigError(f"{source}: the gate is an object with one key, 'protected' (domain → thresholds)")
    protected = data.get("protected", {})
    if not isinstance(protected, dict):
        raise GateConfigError(f"{source}: 'protected' must map domain names to thresholds")
    known = set(known_domains)
    thresholds: dict[str, DomainThreshold] = {}
    for domain, spec in sorted(protected.items()):
        where = f"{source}: protected.{domain}"
        if domain not in known:
            raise GateConfigError(
                f"{where}: unknown domain {domain!r}; the federation's domains are {sorted(known) or 'none yet'} "
                "(its held-out sets and evaluated domains): fix the name or add the domain's held-out set first"
            )
        if not isinstance(spec, dict):
            raise GateConfigError(f"{where}: give an object with {' and/or '.join(LIMITS)}")
        unknown = sorted(set(spec) - {*LIMITS, "against"})
        if unknown:
            raise GateConfigError(f"{where}: unknown keys {unknown}; use {[*LIMITS, 'against']}")
        nats = _limit(spec.get("max_increase_nats"), f"{where}.max_increase_nats")
        fraction = _limit(spec.get("max_increase_fraction"), f"{where}.max_increase_fraction")
        if nats is None and fraction is None:
            raise GateConfigError(f"{where}: a protected domain needs max_increase_nats or max_increase_fraction")
        against = spec.get("against", list(REFERENCES))
        if (
            not isinstance(against, list)
            or not against
            or any(item not in REFERENCES for item in against)
            or len(set(against)) != len(against)
        ):
            raise GateConfigError(f"{where}.against: {against!r}; give a non-empty list of {list(REFERENCES)}")
        thresholds[domain] = DomainThreshold(nats, fraction, tuple(against))
    return PromotionGate(protected=thresholds, source=source)


def federation_domains() -> list[str]:
    """The domains a threshold may name: those with a held-out set in the store, or with recorded evaluations."""
    files = {path.stem for path in heldout_files(artifact_root() / HELDOUT_FOLDER)}
    evaluated = set(VersionEvaluation.objects.values_list("domain", flat=True).distinct())
    return sorted(files | evaluated)


def load_promotion_gate(path: str | None = None) -> PromotionGate | None:
    """The gate of FEDNESTED_PROMOTION_GATE (or `path`); None when no gate is configured. GateConfigError if bad."""
    name = settings.FEDNESTED_PROMOTION_GATE if path is None else path
    if not name:
        return None
    file = Path(name)
    try:
        with file.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise GateConfigError(f"FEDNESTED_PROMOTION_GATE={name}: cannot read it ({error.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise GateConfigError(f"{name}: larger than {MAX_CONFIG_BYTES} bytes; a thresholds file is a few lines")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GateConfigError(f"{name}: not JSON ({error})") from None
    return parse_gate(data, source=name, known_domains=federation_domains())


def check_thresholds(
    gate: PromotionGate,
    losses: Mapping[str, float],
    references: Mapping[str, tuple[str, Mapping[str, float]] | None],
) -> list[Breach]:
    """Every threshold of `gate` the candidate's `losses` are past.

    `references` maps 'parent'/'champion' to (version id, its losses on the same held-out sets), or None where there
    is no such version (a root candidate; no champion yet): then that comparison does not apply. A protected domain
    the candidate or a reference was not scored on is a breach: the gate cannot vouch for what it has not measured.
    """
    breaches: list[Breach] = []
    for domain, threshold in sorted(gate.protected.items()):
        loss = losses.get(domain)
        if loss is None:
            breaches.append(Breach(domain, "candidate", None, "not_evaluated", None, None, None))
            continue
        for against in threshold.against:
            reference = references.get(against)
            if reference is None:
                continue
            version_id, reference_losses = reference
            before = reference_losses.get(domain)
            if before is None:
                breaches.append(Breach(domain, against, version_id, "no_reference_score", None, loss, None))
                continue
            change = loss - before
            if threshold.max_increase_nats is not None and change > threshold.max_increase_nats:
                breaches.append(
                    Breach(domain, against, version_id, "max_increase_nats", threshold.max_increase_nats, loss, before)
                )
            fraction = threshold.max_increase_fraction
            if fraction is not None and before > 0 and change / before > fraction:
                breaches.append(Breach(domain, against, version_id, "max_increase_fraction", fraction, loss, before))
    return breaches


@dataclass(frozen=True)
class GateVerdict:
    """What the gate says of a candidate now: breaches (empty: it may be approved) or a configuration error."""

    configured: bool
    breaches: list[Breach]
    error: str = ""

    @property
    def held(self) -> bool:
        return bool(self.breaches) or bool(self.error)

    def summary(self) -> str:
        if self.error:
            return f"the promotion gate's configuration is invalid, so nothing can be approved: {self.error}"
        return "; ".join(breach.describe() for breach in self.breaches)

    def to_json(self) -> dict[str, Any]:
        return {
            "configured": self.configured,
            "held": self.held,
            "error": self.error,
            "breaches": [breach.to_json() for breach in self.breaches],
        }


def _losses_on(version: ModelVersion, heldout: str, report: ForgettingReport | None) -> dict[str, float]:
    """`version`'s losses on the held-out sets `heldout`: from the candidate's forgetting report, else its own rows."""
    if report is not None and report.heldout == heldout:
        from_report = report.report.get("losses", {}).get(version.version_id)
        if isinstance(from_report, dict) and from_report:
            return {str(domain): float(loss) for domain, loss in from_report.items()}
    return {
        domain: loss
        for domain, loss in VersionEvaluation.objects.filter(version=version, heldout=heldout).values_list(
            "domain", "loss"
        )
    }


def gate_verdict(version: ModelVersion) -> GateVerdict:
    """The gate's verdict on candidate `version` against its parent and the current champion, from recorded scores."""
    try:
        gate = load_promotion_gate()
    except GateConfigError as error:
        return GateVerdict(configured=True, breaches=[], error=str(error))
    if gate is None:
        return GateVerdict(configured=False, breaches=[])
    rows = list(VersionEvaluation.objects.filter(version=version))
    heldout = rows[0].heldout if rows else ""
    losses = {row.domain: row.loss for row in rows}
    report = ForgettingReport.objects.filter(version=version).first()
    references: dict[str, tuple[str, Mapping[str, float]] | None] = {"parent": None, "champion": None}
    if version.parent is not None:
        parent_losses = {row.domain: row.parent_loss for row in rows if row.parent_loss is not None}
        references["parent"] = (version.parent.version_id, parent_losses or _losses_on(version.parent, heldout, report))
    champion = Alias.objects.filter(name=CHAMPION_ALIAS).select_related("version").first()
    if champion is not None and champion.version_id != version.pk:
        references["champion"] = (champion.version.version_id, _losses_on(champion.version, heldout, report))
    return GateVerdict(configured=True, breaches=check_thresholds(gate, losses, references))
