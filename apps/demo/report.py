"""The demo's closing table: per-domain held-out loss of each version beside its parent's. Pure formatting."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class VersionScores:
    """One version's per-domain held-out loss, and the version it was built from."""

    version_id: str
    parent_id: str | None
    loss_by_domain: Mapping[str, float]


def loss_table(versions: Sequence[VersionScores], *, trained_domains: Sequence[str] = ()) -> str:
    """A fixed-width table: one row per domain, one column per version, each child's change against its parent.

    Domains the devices trained on are marked with '*', so a reader sees where the loss should fall and where
    forgetting would show.
    """
    if not versions:
        return "(no versions evaluated)"
    by_id = {version.version_id: version for version in versions}
    domains = sorted({domain for version in versions for domain in version.loss_by_domain})
    header = ["domain", *(version.version_id for version in versions)]
    rows = []
    for domain in domains:
        cells = [f"{domain}{' *' if domain in trained_domains else ''}"]
        for version in versions:
            loss = version.loss_by_domain.get(domain)
            parent = by_id.get(version.parent_id or "")
            parent_loss = parent.loss_by_domain.get(domain) if parent is not None else None
            if loss is None:
                cells.append("—")
            elif parent_loss is None:
                cells.append(f"{loss:.3f}")
            else:
                cells.append(f"{loss:.3f} ({loss - parent_loss:+.3f})")
        rows.append(cells)
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = [
        "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


@dataclass(frozen=True)
class AppliedUpdate:
    """One update as a candidate applied it: who sent it, on which base, how stale, and its mean weight per expert."""

    candidate: str
    parent: str
    client_id: str
    base_version: str
    staleness: int
    weight: float


def staleness_table(rows: Sequence[AppliedUpdate]) -> str:
    """A fixed-width table of the updates each candidate applied, with τ and weight, one line per update."""
    if not rows:
        return "(no updates applied)"
    header = ["candidate", "onto", "update from", "trained on", "τ", "weight"]
    cells = [
        [row.candidate, row.parent, row.client_id, row.base_version, str(row.staleness), f"{row.weight:.3f}"]
        for row in rows
    ]
    widths = [max(len(line[column]) for line in [header, *cells]) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in [header, *cells]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


@dataclass(frozen=True)
class GateOutcome:
    """What the promotion gate said of one candidate: held or not, and each threshold it is past."""

    version_id: str
    held: bool
    reasons: tuple[str, ...] = ()


def gate_table(outcomes: Sequence[GateOutcome]) -> str:
    """One line per candidate: 'passed', or 'HELD' followed by each domain, figure and limit the gate quotes."""
    if not outcomes:
        return "(no candidate was decided)"
    width = max(len(outcome.version_id) for outcome in outcomes)
    lines = []
    for outcome in outcomes:
        if not outcome.held:
            lines.append(f"{outcome.version_id.ljust(width)}  passed: promoted")
            continue
        lines.append(f"{outcome.version_id.ljust(width)}  HELD by the gate, not promoted:")
        lines.extend(f"{' ' * width}    {reason}" for reason in outcome.reasons)
    return "\n".join(lines)
