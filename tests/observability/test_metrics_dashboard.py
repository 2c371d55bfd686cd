"""The Grafana dashboard (deploy/grafana/fednested.json) and the Prometheus rules query only series that exist: every
metric name in their PromQL is one the code exports (or a recording rule, or Prometheus' own `up`), so a renamed
metric cannot leave an empty panel or an alert that never fires."""

import json
import re
from collections.abc import Iterator
from pathlib import Path

import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric

from controlplane.metrics.database import DatabaseCollector
from controlplane.metrics.families import PREFIX
from controlplane.metrics.lag import ConsumerLagCollector
from fednested.messaging import KafkaBusSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
    "summary": ("_sum", "_count"),
}
# PromQL words that look like names: aggregation modifiers, set operators, `bool`, `offset`.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def exported_names() -> set[str]:
    """Sample names of every family the processes export (declared families and the scrape-time collectors)."""
    families: list[Metric] = [family for family in REGISTRY.collect() if family.name.startswith(PREFIX)]
    families += list(DatabaseCollector().describe())
    families += list(ConsumerLagCollector(KafkaBusSettings(bootstrap_servers="127.0.0.1:9"), "g").describe())
    names = {family.name + suffix for family in families for suffix in SUFFIXES[family.type]}
    # The families the code declares must all be found (a family with no samples is still described).
    assert {"fednested_updates_total", "fednested_window_buffered_updates", "fednested_ingest_consumer_lag"} <= names
    return names


def metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression reads, parsed crudely: strings, label matchers, ranges and grouping
    clauses removed, then every identifier not called as a function and not a keyword."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expression)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in NAME.finditer(text):
        following = text[match.end() :].lstrip()
        if following.startswith("(") or match.group() in KEYWORDS:
            continue
        if match.start() > 0 and (text[match.start() - 1].isdigit() or text[match.start() - 1] == "."):
            continue  # the exponent or unit of a number (1e3, 0.5)
        names.add(match.group())
    return names


def rules() -> Iterator[dict[str, str]]:
    document = yaml.safe_load((DEPLOY / "prometheus" / "fednested-rules.yml").read_text())
    for group in document["groups"]:
        yield from group["rules"]


def dashboard_expressions() -> Iterator[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana" / "fednested.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield panel["title"], target["expr"]


def test_the_crude_parser_finds_names_and_only_names() -> None:
    expression = (
        'histogram_quantile(0.99, sum by (view, le) (rate(a_bucket{view!="x y"}[5m]))) / on () b > 1e3 and bool c'
    )
    assert metric_names(expression) == {"a_bucket", "b", "c"}


def test_every_dashboard_and_rule_expression_reads_exported_series_only() -> None:
    known = exported_names() | {rule["record"] for rule in rules() if "record" in rule} | {"up"}
    expressions = [(f"dashboard panel {title!r}", expr) for title, expr in dashboard_expressions()]
    expressions += [(f"rule {rule.get('record') or rule['alert']}", rule["expr"]) for rule in rules()]
    assert len(expressions) > 30
    unknown = {where: sorted(metric_names(expr) - known) for where, expr in expressions if metric_names(expr) - known}
    assert unknown == {}
    # And every panel reads at least one of our series, not only `up`.
    assert all(metric_names(expr) for _, expr in dashboard_expressions())
