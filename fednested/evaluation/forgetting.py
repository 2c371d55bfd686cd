"""The forgetting report: how a candidate's per-domain held-out loss compares with every version before it in its line.

Pure functions over a table of losses (version → domain → mean next-token cross-entropy, in nats), oldest version
first and the candidate last. The continual-learning measures are defined on accuracies; here they are adapted to
losses (lower is better), with signs chosen so that the figures read as in the papers:

- forgetting of a domain (RWalk, Chaudhry et al. 2018, eq. 10 adapted): the candidate's loss minus the best (lowest)
  loss any earlier version in the line reached on that domain, floored at 0 — how much of the best-ever result the
  candidate has lost; average forgetting is its mean over the domains that earlier versions were scored on;
- backward transfer (GEM, Lopez-Paz and Ranzato 2017, adapted): the mean over domains of (loss of the first version
  in the line that was scored on the domain) − (the candidate's loss). Positive: the line has since improved on the
  domain; negative BWT is forgetting.

docs/forgetting-and-promotion-gate.md states the adaptation in full.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

REPORT_FORMAT = 1


@dataclass(frozen=True)
class Comparison:
    """The candidate's loss on one domain against one earlier version's loss on the same held-out set."""

    version_id: str
    loss: float
    change: float

    @property
    def relative_change(self) -> float | None:
        """change ÷ the earlier loss; None where that loss is 0 (a relative figure would be infinite)."""
        return self.change / self.loss if self.loss != 0 else None


@dataclass(frozen=True)
class DomainForgetting:
    """One domain of the report: the candidate's loss, its comparisons, and the two continual-learning measures."""

    domain: str
    loss: float
    vs_parent: Comparison | None
    vs_champions: tuple[Comparison, ...]
    best_earlier: Comparison | None
    first: Comparison | None

    @property
    def forgetting(self) -> float | None:
        """max(0, loss − lowest earlier loss); None when no earlier version was scored on this domain."""
        return None if self.best_earlier is None else max(0.0, self.best_earlier.change)

    @property
    def backward_transfer(self) -> float | None:
        """first version's loss − candidate's loss (negative: forgotten); None when no earlier version had it."""
        return None if self.first is None else -self.first.change


@dataclass(frozen=True)
class ForgettingReport:
    """Per-domain forgetting of `candidate` against its parent and the earlier champions of its line."""

    candidate: str
    parent: str | None
    champions: tuple[str, ...]
    versions: tuple[str, ...]
    losses: dict[str, dict[str, float]]
    domains: tuple[DomainForgetting, ...]

    @property
    def average_forgetting(self) -> float | None:
        values = [row.forgetting for row in self.domains if row.forgetting is not None]
        return sum(values) / len(values) if values else None

    @property
    def backward_transfer(self) -> float | None:
        values = [row.backward_transfer for row in self.domains if row.backward_transfer is not None]
        return sum(values) / len(values) if values else None

    def domain(self, name: str) -> DomainForgetting | None:
        return next((row for row in self.domains if row.domain == name), None)

    def to_json(self) -> dict[str, Any]:
        """The report as stored with the version and served by the API (plain JSON types only)."""

        def comparison(value: Comparison | None) -> dict[str, Any] | None:
            if value is None:
                return None
            return {
                "version_id": value.version_id,
                "loss": value.loss,
                "change": value.change,
                "relative_change": value.relative_change,
            }

        return {
            "format": REPORT_FORMAT,
            "candidate": self.candidate,
            "parent": self.parent,
            "champions": list(self.champions),
            "versions": list(self.versions),
            "losses": {version: dict(sorted(row.items())) for version, row in self.losses.items()},
            "average_forgetting": self.average_forgetting,
            "backward_transfer": self.backward_transfer,
            "domains": {
                row.domain: {
                    "loss": row.loss,
                    "vs_parent": comparison(row.vs_parent),
                    "vs_champions": [comparison(item) for item in row.vs_champions],
                    "best_earlier": comparison(row.best_earlier),
                    "first": comparison(row.first),
                    "forgetting": row.forgetting,
                    "backward_transfer": row.backward_transfer,
                }
                for row in self.domains
            },
        }


def _check_losses(versions: Sequence[str], losses: Mapping[str, Mapping[str, float]]) -> None:
    if not versions:
        raise ValueError("a forgetting report needs at least the candidate in `versions`")
    if len(set(versions)) != len(versions):
        raise ValueError(f"versions {list(versions)} name a version twice; a lineage has each version once")
    unknown = sorted(set(losses) - set(versions))
    if unknown:
        raise ValueError(f"losses given for versions {unknown} that are not in the lineage {list(versions)}")
    for version, row in losses.items():
        for domain, loss in row.items():
            if not math.isfinite(loss) or loss < 0:
                raise ValueError(f"loss of {version!r} on {domain!r} is {loss}: a cross-entropy is finite and ≥ 0")


def forgetting_report(
    versions: Sequence[str],
    losses: Mapping[str, Mapping[str, float]],
    *,
    parent: str | None,
    champions: Sequence[str],
) -> ForgettingReport:
    """The report of the last of `versions` (the candidate), from each version's per-domain held-out loss.

    `versions` runs oldest first, candidate last; `parent` and `champions` name versions of it (the parent need not
    have been a champion). A version missing a domain in `losses` was not scored on it and is left out of that
    domain's figures; domains are those the candidate was scored on.
    """
    _check_losses(versions, losses)
    *earlier, candidate = versions
    for name, role in [(parent, "parent"), *((champion, "champion") for champion in champions)]:
        if name is not None and name not in earlier:
            raise ValueError(f"{role} {name!r} is not an earlier version of the lineage {list(versions)}")
    candidate_losses = losses.get(candidate, {})
    rows = []
    for domain in sorted(candidate_losses):
        loss = float(candidate_losses[domain])

        def against(version: str, domain: str = domain, loss: float = loss) -> Comparison | None:
            before = losses.get(version, {}).get(domain)
            return None if before is None else Comparison(version, float(before), loss - float(before))

        scored = [comparison for comparison in (against(version) for version in earlier) if comparison is not None]
        rows.append(
            DomainForgetting(
                domain=domain,
                loss=loss,
                vs_parent=against(parent) if parent is not None else None,
                vs_champions=tuple(item for item in (against(champion) for champion in champions) if item is not None),
                # The lowest earlier loss; of equal ones, the oldest (the first version to reach it).
                best_earlier=min(scored, key=lambda item: item.loss) if scored else None,
                first=scored[0] if scored else None,
            )
        )
    return ForgettingReport(
        candidate=candidate,
        parent=parent,
        champions=tuple(champions),
        versions=tuple(versions),
        losses={version: dict(losses.get(version, {})) for version in versions},
        domains=tuple(rows),
    )
