"""Formatting for console templates: status badges (text and colour) and signed numbers for loss changes."""

from typing import Any

from django import template
from django.utils.html import format_html
from django.utils.safestring import SafeString

register = template.Library()

# Every status any console page shows → badge style. The word is always printed: colour is only a second cue.
BADGE_STYLES = {
    # versions
    "champion": "good",
    "candidate": "info",
    "archived": "muted",
    "rejected": "bad",
    # approvals
    "pending": "warn",
    "approved": "good",
    # devices
    "active": "good",
    "revoked": "bad",
    # updates
    "buffered": "info",
    "applied": "good",
    # rounds and tasks
    "open": "info",
    "aggregating": "warn",
    "closed": "muted",
    "cancelled": "muted",
    "running": "warn",
    "succeeded": "good",
    "failed": "bad",
}


@register.simple_tag
def status_badge(status: str, label: str = "") -> SafeString:
    """<span class="badge badge-…">label</span> for a status value."""
    style = BADGE_STYLES.get(str(status), "muted")
    return format_html('<span class="badge badge-{}">{}</span>', style, label or status)


@register.filter
def signed(value: Any, digits: int = 3) -> str:
    """A number with an explicit sign (+0.120, −0.045), so a change reads as a change; '—' for nothing."""
    if value is None:
        return "—"
    number = float(value)
    text = f"{abs(number):.{int(digits)}f}"
    if float(text) == 0:
        return f"±{text}"
    return f"+{text}" if number > 0 else f"−{text}"


@register.filter
def percent(value: Any, digits: int = 1) -> str:
    """A fraction as a signed percentage (−12.3 %); '—' for nothing."""
    if value is None:
        return "—"
    return f"{signed(float(value) * 100, digits)} %"


@register.filter
def decimal(value: Any, digits: int = 3) -> str:
    """A float with fixed digits; '—' for nothing."""
    if value is None:
        return "—"
    return f"{float(value):.{int(digits)}f}"


@register.filter
def filesize(value: Any) -> str:
    """Bytes in binary units with one decimal (Django's filesizeformat uses non-breaking spaces tests find awkward)."""
    if value is None:
        return "—"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
