"""What each kind of data-engine rule takes (its params, declared once) and how it judges one domain's signals.

A rule's evaluation reads only: it returns the evidence that makes it fire, or None. Recording the trigger and
publishing the task is `apps.dataengine.services`' business.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.db.models import Count, Sum
from django.utils import timezone
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from apps.dataengine.choices import RuleKind
from apps.dataengine.models import DataEngineRule, DeviceSignal
from apps.federation.jobs import HELDOUT_FOLDER
from apps.registry.storage import artifact_path, artifact_root

logger = logging.getLogger(__name__)

# Reports one rising-loss rule may look back over: enough for a trend, small enough to read on every report.
MAX_WINDOW = 500


class RuleParams(BaseModel):
    """Params of one kind of rule: JSON types exactly, nothing undeclared (a misspelt key is an error)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class RisingLossParams(RuleParams):
    """rising_loss: over the domain's last `window` reports with a loss, the mean of the later half exceeds the mean
    of the earlier half by at least `min_rise` (nats)."""

    window: int = Field(default=10, ge=2, le=MAX_WINDOW, description="Reports with a loss to compare (the last N).")
    min_rise: float = Field(default=0.1, gt=0, allow_inf_nan=False, description="Least rise of the mean loss, nats.")
    include_dp_noised: bool = Field(
        default=True, description="Count DP-noised losses too (the noise averages out over the halves)."
    )


class UncoveredDomainParams(RuleParams):
    """uncovered_domain: the domain has traffic (at least `min_reports` reports and `min_tokens` tokens within
    `window_s`) but no protected held-out evaluation set: no `<domain>.jsonl` in the store's held-out folder, or the
    promotion gate (FEDNESTED_PROMOTION_GATE) does not protect it."""

    min_reports: int = Field(default=1, ge=1, le=1_000_000, description="Reports that count as traffic.")
    min_tokens: int = Field(default=0, ge=0, description="Tokens that count as traffic.")
    window_s: int = Field(default=7 * 24 * 3600, ge=60, description="How far back traffic is counted, seconds.")
    heldout_dir: str = Field(
        default=HELDOUT_FOLDER, min_length=1, max_length=512, description="Held-out folder of the artifact store."
    )


PARAMS: dict[str, type[RuleParams]] = {
    RuleKind.RISING_LOSS: RisingLossParams,
    RuleKind.UNCOVERED_DOMAIN: UncoveredDomainParams,
}


def checked_rule_params(kind: str, params: Any) -> RuleParams:
    """The params of a rule of `kind`, parsed; ValidationError naming 'kind' or 'params' (each line its param)."""
    model = PARAMS.get(kind)
    if model is None:
        raise ValidationError({"kind": f"unknown rule kind {kind!r}: use one of {', '.join(PARAMS)}"})
    if not isinstance(params, Mapping):
        raise ValidationError({"params": f"params must be a JSON object, got {type(params).__name__}"})
    try:
        return model.model_validate(dict(params))
    except PydanticValidationError as error:
        raise ValidationError({"params": _problems(error, model, kind)}) from None


def _problems(error: PydanticValidationError, model: type[RuleParams], kind: str) -> list[str]:
    """One line per problem, each starting with the param it is about."""
    lines = []
    for problem in error.errors(include_url=False):
        key = ".".join(str(part) for part in problem["loc"]) or "params"
        if problem["type"] == "extra_forbidden":
            lines.append(f"{key}: not a parameter of {kind} rules (they take {', '.join(model.model_fields)})")
        else:
            shown = repr(problem["input"])
            lines.append(f"{key}: {problem['msg']}, got {shown if len(shown) <= 80 else shown[:77] + '...'}")
    return lines


def evaluate(rule: DataEngineRule, domain: str) -> dict[str, Any] | None:
    """The evidence that `rule` fires for `domain` now, or None. A rule whose stored params no longer parse does not
    fire (logged): it cannot have been saved so through the services."""
    try:
        params = checked_rule_params(rule.kind, rule.params)
    except ValidationError as error:
        logger.error("data-engine rule %r has unusable params, skipped: %s", rule.name, error.messages)
        return None
    if isinstance(params, RisingLossParams):
        return rising_loss(params, domain)
    if isinstance(params, UncoveredDomainParams):
        return uncovered_domain(params, domain)
    raise AssertionError(f"no evaluation for rule kind {rule.kind!r}")


def loss_rise(losses: list[float]) -> float:
    """Mean of the later half minus mean of the earlier half (oldest first; an odd middle report is left out)."""
    half = len(losses) // 2
    earlier, later = losses[:half], losses[len(losses) - half :]
    return sum(later) / half - sum(earlier) / half


def rising_loss(params: RisingLossParams, domain: str) -> dict[str, Any] | None:
    recent = DeviceSignal.objects.filter(domain=domain, loss__isnull=False)
    if not params.include_dp_noised:
        recent = recent.filter(dp_noised=False)
    rows = list(recent.order_by("-reported_at", "-id").values("id", "client_id", "loss", "version", "reported_at"))[
        : params.window
    ]
    if len(rows) < params.window:
        return None
    rows.reverse()  # oldest first
    losses = [float(row["loss"]) for row in rows if row["loss"] is not None]  # all are: filtered above
    rise = loss_rise(losses)
    if rise < params.min_rise:
        return None
    return {
        "rule": RuleKind.RISING_LOSS.value,
        "window": params.window,
        "min_rise": params.min_rise,
        "rise": rise,
        "signals": [
            {
                "id": row["id"],
                "client_id": row["client_id"],
                "loss": row["loss"],
                "version": row["version"],
                "reported_at": row["reported_at"].isoformat(),
            }
            for row in rows
        ],
    }


def protected_heldout_domains(heldout_dir: str) -> tuple[set[str], set[str] | None]:
    """(domains with a held-out set in `heldout_dir`, domains the promotion gate protects or None without a gate).

    Raises ValidationError for a folder outside the store and GateConfigError for a broken gate file.
    """
    # Imported here: the gate module imports the registry and federation jobs at import time.
    from apps.governance.gate import load_promotion_gate

    try:
        directory = artifact_path(heldout_dir, artifact_root())
    except ValueError as error:
        raise ValidationError({"params": [f"heldout_dir: {error}"]}) from None
    with_sets = {path.stem for path in directory.glob("*.jsonl")} if directory.is_dir() else set()
    gate = load_promotion_gate()
    return with_sets, (set(gate.protected) if gate is not None else None)


def uncovered_domain(params: UncoveredDomainParams, domain: str) -> dict[str, Any] | None:
    since = timezone.now() - timedelta(seconds=params.window_s)
    recent = DeviceSignal.objects.filter(domain=domain, received_at__gte=since)
    totals = recent.aggregate(reports=Count("id"), tokens=Sum("tokens"))
    reports, tokens = int(totals["reports"] or 0), int(totals["tokens"] or 0)
    if reports < params.min_reports or tokens < params.min_tokens:
        return None
    from apps.governance.gate import GateConfigError

    try:
        with_sets, protected = protected_heldout_domains(params.heldout_dir)
    except (ValidationError, GateConfigError) as error:
        logger.error("uncovered_domain rule cannot read the held-out sets or the gate: %s", error)
        return None
    has_set = domain in with_sets
    is_protected = protected is not None and domain in protected
    if has_set and is_protected:
        return None
    if not has_set:
        why = f"no held-out set {domain}.jsonl in the store's {params.heldout_dir!r} folder"
    elif protected is None:
        why = "no promotion gate is configured (FEDNESTED_PROMOTION_GATE), so no domain is protected"
    else:
        why = "the promotion gate does not protect it"
    return {
        "rule": RuleKind.UNCOVERED_DOMAIN.value,
        "why": why,
        "has_heldout_set": has_set,
        "protected": is_protected,
        "reports": reports,
        "tokens": tokens,
        "window_s": params.window_s,
        # The latest ones: enough to follow up, bounded however busy the domain is.
        "signal_ids": list(recent.order_by("-reported_at", "-id").values_list("id", flat=True)[:50]),
    }
