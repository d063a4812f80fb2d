"""What the monitoring files say, for the static checks and the end-to-end Prometheus test:
the documented metric families (README "Monitoring" table), the dashboard's panel queries with
their Grafana variables substituted, and the alerting rules."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "marketflow.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "marketflow.yml"

_ROW = re.compile(r"^\| `(marketflow_[a-z0-9_]+)` \| (counter|gauge|histogram) \|", re.MULTILINE)
# What Grafana puts in place of its variables when "All" is selected, and a rate window that
# holds a few samples at the test's 1 s scrape interval.
GRAFANA_VARIABLES = {"$__rate_interval": "10s", "$__interval": "10s", "$source": ".*",
                     "$pair": ".*"}  # fmt: skip


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref: str
    expr: str  # with the variables substituted


def documented_families() -> dict[str, str]:
    """{family name: type} of the README's "Monitoring" table."""
    text = README.read_text()
    section = text.split("\n## Monitoring\n", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2) for m in _ROW.finditer(section)}


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def substitute(expr: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    assert "$" not in expr, f"a Grafana variable the tests do not know: {expr}"
    return expr


def panel_queries() -> list[PanelQuery]:
    out = []
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            out.append(PanelQuery(panel["title"], target["refId"], substitute(target["expr"])))
    return out


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


_NAME = re.compile(r"\b(marketflow_[a-z0-9_]+|up)\b")


def metric_names(expr: str) -> set[str]:
    """Series names an expression reads, with histogram/counter sample suffixes folded back
    into their family (``_bucket``, ``_count``, ``_sum``, ``_total``)."""
    names = set()
    for name in _NAME.findall(expr):
        names.add(re.sub(r"_(bucket|count|sum|total)$", "", name))
    return names
