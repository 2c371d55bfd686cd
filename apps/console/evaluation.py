"""Per-domain evaluation of a version beside its parent's: the comparison the version page shows officers.

The evaluation worker records one `registry.VersionEvaluation` row per domain, with the parent's scores on the same
held-out set; `DomainComparison` turns a row into what the page shows (change, relative change, verdict).
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from apps.registry.models import ForgettingReport, ModelVersion, VersionEvaluation

# Relative loss changes smaller than this read as "no change": evaluation noise on held-out sets of a few
# hundred tokens is about this size, and calling it an improvement would mislead an officer.
UNCHANGED_RELATIVE_TOLERANCE = 0.005


@dataclass(frozen=True)
class DomainComparison:
    """One row of the per-domain table: loss and perplexity of the version and its parent on one domain."""

    domain: str
    loss: float | None
    parent_loss: float | None
    perplexity: float | None
    parent_perplexity: float | None

    @property
    def loss_delta(self) -> float | None:
        if self.loss is None or self.parent_loss is None:
            return None
        return self.loss - self.parent_loss

    @property
    def relative_change(self) -> float | None:
        delta = self.loss_delta
        if delta is None or self.parent_loss is None or self.parent_loss == 0:
            return None
        return delta / self.parent_loss

    @property
    def verdict(self) -> str:
        """'better', 'worse', 'same', or 'unknown' when one side was not evaluated on this domain."""
        change = self.relative_change
        if change is None:
            return "unknown"
        if abs(change) < UNCHANGED_RELATIVE_TOLERANCE:
            return "same"
        return "better" if change < 0 else "worse"


@dataclass(frozen=True)
class VersionEvaluationSummary:
    """A version's recorded evaluation: one comparison per domain, and when, by whom and on what it was scored."""

    rows: list[DomainComparison]
    evaluated_at: datetime
    evaluated_by: str
    heldout: str

    @property
    def has_parent_scores(self) -> bool:
        return any(row.parent_loss is not None for row in self.rows)


def compare(row: VersionEvaluation, fallback_parent: VersionEvaluation | None = None) -> DomainComparison:
    """The comparison of one recorded row; `fallback_parent` (the parent's own row) fills in missing parent scores."""
    parent_loss, parent_perplexity = row.parent_loss, row.parent_perplexity
    if parent_loss is None and fallback_parent is not None:
        parent_loss, parent_perplexity = fallback_parent.loss, fallback_parent.perplexity
    return DomainComparison(
        domain=row.domain,
        loss=row.loss,
        parent_loss=parent_loss,
        perplexity=row.perplexity,
        parent_perplexity=parent_perplexity,
    )


def evaluation_summary(version: ModelVersion) -> VersionEvaluationSummary | None:
    """The version's per-domain comparisons, or None if it was never evaluated."""
    rows = list(VersionEvaluation.objects.filter(version=version).order_by("domain"))
    if not rows:
        return None
    parent_rows: dict[str, VersionEvaluation] = {}
    if version.parent_id is not None and any(row.parent_loss is None for row in rows):
        # Rows recorded without the parent's scores: fall back to the parent's own evaluation of the domain.
        parent_rows = {row.domain: row for row in VersionEvaluation.objects.filter(version_id=version.parent_id)}
    return VersionEvaluationSummary(
        rows=[compare(row, parent_rows.get(row.domain)) for row in rows],
        evaluated_at=max(row.evaluated_at for row in rows),
        evaluated_by=rows[0].evaluated_by_label,
        heldout=rows[0].heldout,
    )


def domain_losses(version: ModelVersion) -> dict[str, float]:
    """domain → recorded held-out loss of `version` (empty if never evaluated)."""
    return dict(VersionEvaluation.objects.filter(version=version).order_by("domain").values_list("domain", "loss"))


# Bar colours of the versions in a forgetting chart, oldest first; the candidate is always the last (accent) colour.
LINE_COLOURS = ("#9aa5b4", "#6f7d90", "#4f5b6b", "#2a4d7a", "#7a4b00", "#5b3f8c", "#1e6b3a", "#8a5a44")
CANDIDATE_COLOUR = "#1f5fbf"
FORGETTING_COLOUR = "#a3241b"
TRANSFER_COLOUR = "#1e6b3a"


def _svg_text(x: float, y: float, text: str, *, anchor: str = "middle", size: int = 11) -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}">{escape(text)}</text>'


def loss_chart_svg(report: dict[str, Any]) -> SafeString:
    """Grouped bars: per domain, the held-out loss of each version of the line (oldest first, candidate last).

    Drawn server-side as inline SVG, so the page makes no request for a chart library; every bar has a <title> with
    its figure, for a reader who hovers or a screen reader.
    """
    versions: list[str] = list(report.get("versions", []))
    losses: dict[str, dict[str, float]] = report.get("losses", {})
    domains = sorted(report.get("domains", {}))
    values = [losses.get(v, {}).get(d) for v in versions for d in domains]
    top = max((value for value in values if value is not None), default=0.0)
    if not versions or not domains or top <= 0:
        return SafeString("")
    bar, gap, height, left, base = 14, 18, 160, 44, 180
    group = bar * len(versions) + gap
    # Wide enough for the legend's version ids under a chart of few domains.
    width = max(left + group * len(domains) + 10, left + 16 + 8 * max(len(v) + 12 for v in versions))
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {base + 60 + 16 * len(versions)}" '
        f'width="{width}" aria-labelledby="loss-chart-title" data-testid="loss-chart">',
        '<title id="loss-chart-title">Held-out loss per domain, each version of the line</title>',
        f'<line x1="{left}" y1="{base}" x2="{width - 10}" y2="{base}" stroke="#4f5b6b"/>',
        _svg_text(left - 4, base - height + 4, f"{top:.2f}", anchor="end", size=10),
        _svg_text(left - 4, base, "0", anchor="end", size=10),
    ]
    for g, domain in enumerate(domains):
        x0 = left + g * group + gap / 2
        for i, version in enumerate(versions):
            loss = losses.get(version, {}).get(domain)
            if loss is None:
                continue
            h = height * loss / top
            colour = CANDIDATE_COLOUR if i == len(versions) - 1 else LINE_COLOURS[i % len(LINE_COLOURS)]
            parts.append(
                f'<rect x="{x0 + i * bar:.1f}" y="{base - h:.1f}" width="{bar - 2}" height="{h:.1f}" fill="{colour}">'
                f"<title>{escape(domain)} · {escape(version)}: loss {loss:.4f}</title></rect>"
            )
        parts.append(_svg_text(x0 + bar * len(versions) / 2, base + 14, domain))
    for i, version in enumerate(versions):
        colour = CANDIDATE_COLOUR if i == len(versions) - 1 else LINE_COLOURS[i % len(LINE_COLOURS)]
        y = base + 36 + 16 * i
        role = " (candidate)" if i == len(versions) - 1 else (" (parent)" if version == report.get("parent") else "")
        parts.append(f'<rect x="{left}" y="{y - 9}" width="10" height="10" fill="{colour}"/>')
        parts.append(_svg_text(left + 16, y, version + role, anchor="start"))
    parts.append("</svg>")
    return mark_safe("".join(parts))  # every text in it went through escape()


def forgetting_chart_svg(report: dict[str, Any]) -> SafeString:
    """Per domain, forgetting (≥ 0, red) and backward transfer (signed, green above the axis, red below), in nats."""
    rows = [
        (domain, figures.get("forgetting"), figures.get("backward_transfer"))
        for domain, figures in sorted(report.get("domains", {}).items())
        if figures.get("forgetting") is not None
    ]
    if not rows:
        return SafeString("")
    scale = max(max(abs(f or 0.0), abs(b or 0.0)) for _, f, b in rows) or 1.0
    bar, gap, half, left = 16, 24, 80, 54
    axis = 20 + half
    # Wide enough for the legend under a chart of one or two domains.
    width = max(left + (2 * bar + gap) * len(rows) + 10, 440)
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {2 * half + 70}" width="{width}" '
        'aria-labelledby="forgetting-chart-title" data-testid="forgetting-chart">',
        '<title id="forgetting-chart-title">Forgetting and backward transfer per domain (nats)</title>',
        f'<line x1="{left}" y1="{axis}" x2="{width - 10}" y2="{axis}" stroke="#4f5b6b"/>',
        _svg_text(left - 4, axis - half + 4, f"+{scale:.3f}", anchor="end", size=10),
        _svg_text(left - 4, axis + half, f"−{scale:.3f}", anchor="end", size=10),
    ]
    for g, (domain, forgetting, transfer) in enumerate(rows):
        x0 = left + g * (2 * bar + gap) + gap / 2
        for i, (label, value, colour) in enumerate(
            (
                ("forgetting", forgetting, FORGETTING_COLOUR),
                ("backward transfer", transfer, TRANSFER_COLOUR if (transfer or 0) >= 0 else FORGETTING_COLOUR),
            )
        ):
            if value is None:
                continue
            h = half * abs(value) / scale
            y = axis - h if value >= 0 else axis
            hatch = ' fill-opacity="0.55"' if i == 1 else ""
            parts.append(
                f'<rect x="{x0 + i * bar:.1f}" y="{y:.1f}" width="{bar - 2}" height="{h:.1f}" fill="{colour}"{hatch}>'
                f"<title>{escape(domain)}: {label} {value:+.4f} nats</title></rect>"
            )
        parts.append(_svg_text(x0 + bar, axis + half + 16, domain))
    legend_y = axis + half + 36
    parts.append(f'<rect x="{left}" y="{legend_y - 9}" width="10" height="10" fill="{FORGETTING_COLOUR}"/>')
    parts.append(_svg_text(left + 16, legend_y, "forgetting (left bar)", anchor="start"))
    parts.append(
        f'<rect x="{left + 170}" y="{legend_y - 9}" width="10" height="10" '
        f'fill="{TRANSFER_COLOUR}" fill-opacity="0.55"/>'
    )
    parts.append(_svg_text(left + 186, legend_y, "backward transfer (right bar)", anchor="start"))
    parts.append("</svg>")
    return mark_safe("".join(parts))  # every text in it went through escape()


@dataclass(frozen=True)
class ForgettingView:
    """What the version page shows of a forgetting report: its figures and the two charts."""

    report: dict[str, Any]
    average_forgetting: float | None
    backward_transfer: float | None
    computed_at: datetime
    loss_chart: SafeString
    forgetting_chart: SafeString

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One row per domain, with the changes against the parent and each earlier champion (None: not scored)."""
        champions = list(self.report.get("champions", []))
        rows = []
        for domain, figures in sorted(self.report.get("domains", {}).items()):
            against = {item["version_id"]: item["change"] for item in figures.get("vs_champions", [])}
            parent = figures.get("vs_parent")
            rows.append(
                {
                    "domain": domain,
                    "loss": figures.get("loss"),
                    "vs_parent": parent["change"] if parent else None,
                    "vs_champions": [against.get(version_id) for version_id in champions],
                    "forgetting": figures.get("forgetting"),
                    "backward_transfer": figures.get("backward_transfer"),
                }
            )
        return rows

    @property
    def compared_with(self) -> list[str]:
        return list(self.report.get("versions", []))[:-1]


def forgetting_view(version: ModelVersion) -> ForgettingView | None:
    """The version's forgetting report for its page, or None when none was computed."""
    row = ForgettingReport.objects.filter(version=version).first()
    if row is None:
        return None
    return ForgettingView(
        report=row.report,
        average_forgetting=row.average_forgetting,
        backward_transfer=row.backward_transfer,
        computed_at=row.computed_at,
        loss_chart=loss_chart_svg(row.report),
        forgetting_chart=forgetting_chart_svg(row.report),
    )
