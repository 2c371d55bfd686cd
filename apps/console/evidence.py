"""The evidence a candidate's page shows officers beyond its own scores: per-domain loss along its line of parents,
what each contributing update weighed and how stale it was, the policy decisions taken on the tasks that made it,
and how its manifest differs from its parent's.

Read-only: everything here is drawn from rows and manifests other services wrote (registry evaluations, the manifest
lineage the aggregation worker recorded, audit events), so the page says what was recorded, never a recomputation.
"""

import json
from dataclasses import dataclass
from typing import Any

from django.db.models import Q

from apps.federation.choices import TaskKind, parse_task_run_ref
from apps.federation.models import TrainingTask, Update
from apps.governance.models import AuditEvent
from apps.registry.choices import LineageKind
from apps.registry.models import LineageEdge, ModelVersion, VersionEvaluation

# How many versions back the lineage chart reaches (the candidate included): enough to see a trend over several
# promotions without a page that reads the whole history of a long-lived family.
LINEAGE_CHART_DEPTH = 8
POLICY_VERB_PREFIX = "governance.policy."
# Manifest keys the diff leaves out: they differ between any two versions by construction (ids, file digests, the
# lineage shown in its own panels), so listing them would bury the configuration changes an officer looks for.
DIFF_IGNORED_KEYS = frozenset({"version_id", "parent", "files", "lineage", "created_at", "manifest_sha256"})
DIFF_VALUE_CHARS = 120


def version_line(version: ModelVersion, depth: int = LINEAGE_CHART_DEPTH) -> list[ModelVersion]:
    """`version` and its ancestors, oldest first, at most `depth` of them (a cycle cannot occur: parents are
    registered before their children, and the walk stops at a repeat anyway)."""
    line = [version]
    seen = {version.pk}
    current = version
    while current.parent_id is not None and len(line) < depth and current.parent_id not in seen:
        current = ModelVersion.objects.only("pk", "version_id", "parent_id", "status").get(pk=current.parent_id)
        seen.add(current.pk)
        line.append(current)
    return list(reversed(line))


def lineage_chart(version: ModelVersion) -> dict[str, Any] | None:
    """Chart data of held-out loss per domain along the line (x: version ids, one series per domain), or None when
    no version of the line was evaluated. A version not scored on a domain has a gap (null), never a made-up value."""
    line = version_line(version)
    losses: dict[int, dict[str, float]] = {}
    for version_pk, domain, loss in VersionEvaluation.objects.filter(version__in=line).values_list(
        "version_id", "domain", "loss"
    ):
        losses.setdefault(version_pk, {})[domain] = loss
    domains = sorted({domain for scores in losses.values() for domain in scores})
    if not domains:
        return None
    return {
        "depth": LINEAGE_CHART_DEPTH,
        "labels": [member.version_id for member in line],
        "statuses": [member.status for member in line],
        "series": [
            {"domain": domain, "losses": [losses.get(member.pk, {}).get(domain) for member in line]}
            for domain in domains
        ],
    }


@dataclass(frozen=True)
class Contribution:
    """One update that went into the version: who sent it, how stale it was, and the weight aggregation gave it."""

    update_id: str
    update: Update | None
    staleness: int | None
    reliability: float | None
    experts_weighted: int
    total_weight: float | None
    mean_weight: float | None


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def contributions(version: ModelVersion, update_ids: list[str]) -> list[Contribution]:
    """The contributing updates with the staleness and per-expert weights the aggregation recorded in the manifest
    lineage (`lineage.staleness`, `lineage.aggregation.weights`) and the reliability in its round's record; the
    update row's own τ when the manifest has none (a version registered by hand)."""
    lineage = _mapping(_mapping(version.manifest).get("lineage"))
    staleness = _mapping(lineage.get("staleness"))
    weights = _mapping(_mapping(lineage.get("aggregation")).get("weights"))
    rows = {
        update.update_id: update
        for update in Update.objects.filter(update_id__in=update_ids).select_related("device", "base_version", "round")
    }
    result = []
    for update_id in update_ids:
        update = rows.get(update_id)
        record = _mapping(
            _mapping(_mapping(update.round.record if update and update.round else {}).get("updates")).get(update_id)
        )
        per_expert = [float(w) for w in _mapping(weights.get(update_id)).values() if isinstance(w, int | float)]
        tau = staleness.get(update_id, record.get("staleness", update.staleness if update else None))
        reliability = record.get("reliability")
        result.append(
            Contribution(
                update_id=update_id,
                update=update,
                staleness=tau if isinstance(tau, int) else None,
                reliability=float(reliability) if isinstance(reliability, int | float) else None,
                experts_weighted=sum(1 for w in per_expert if w > 0),
                total_weight=sum(per_expert) if per_expert else None,
                mean_weight=sum(per_expert) / len(per_expert) if per_expert else None,
            )
        )
    return result


def producing_tasks(version: ModelVersion) -> list[int]:
    """Primary keys of the training tasks that made `version`: those of the window whose candidate it is, the task
    its manifest lineage names (the aggregation job that wrote it), and the core-update job its run lineage edge
    names (`core-update-task-<pk>`, apps.federation.choices.task_run_ref)."""
    lineage = _mapping(_mapping(version.manifest).get("lineage"))
    named = [lineage["task"]] if isinstance(lineage.get("task"), int) else []
    for ref in LineageEdge.objects.filter(version=version, kind=LineageKind.RUN).values_list("source_ref", flat=True):
        parsed = parse_task_run_ref(ref)
        if parsed is not None and parsed[0] == TaskKind.CORE_UPDATE:
            named.append(parsed[1])
    condition = Q(round__candidate=version) | Q(pk__in=named)
    return list(TrainingTask.objects.filter(condition).values_list("pk", flat=True))


def policy_decisions(version: ModelVersion) -> list[AuditEvent]:
    """Audit events of policy decisions (verbs `governance.policy.*`) on the tasks that made `version`, oldest first."""
    tasks = [str(pk) for pk in producing_tasks(version)]
    if not tasks:
        return []
    return list(
        AuditEvent.objects.filter(
            verb__startswith=POLICY_VERB_PREFIX, object_type="federation.trainingtask", object_id__in=tasks
        ).order_by("created_at", "id")
    )


@dataclass(frozen=True)
class ConfigChange:
    """One key of the manifest that differs from the parent's: `change` is added, removed or changed."""

    key: str
    change: str
    before: str
    after: str


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key in sorted(value):
            if not prefix and key in DIFF_IGNORED_KEYS:
                continue
            flat.update(_flatten(value[key], f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
        return flat
    return {prefix: value} if prefix else {}


def _shown(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= DIFF_VALUE_CHARS else text[: DIFF_VALUE_CHARS - 1] + "…"


def config_diff(version: ModelVersion) -> list[ConfigChange] | None:
    """Keys of the manifest (architecture, config, partition map, safeguards…) added, removed or changed against the
    parent's manifest, in key order; None for a root version (nothing to compare with)."""
    if version.parent is None:
        return None
    before, after = _flatten(version.parent.manifest), _flatten(version.manifest)
    changes = []
    for key in sorted(before.keys() | after.keys()):
        if key not in before:
            changes.append(ConfigChange(key, "added", "", _shown(after[key])))
        elif key not in after:
            changes.append(ConfigChange(key, "removed", _shown(before[key]), ""))
        elif before[key] != after[key]:
            changes.append(ConfigChange(key, "changed", _shown(before[key]), _shown(after[key])))
    return changes
