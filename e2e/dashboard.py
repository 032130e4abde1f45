"""The chart's Grafana dashboard against what the code exports: metric names on both sides.

`dashboard_metric_names` reads the dashboard JSON and returns every metric name its queries use (each panel
target's `expr`, rows' nested panels included, and the `label_values(metric, label)` queries of its template
variables). `exported_names` returns the sample names of a Prometheus text exposition (`foo_total`,
`foo_bucket`, `foo_sum`, ...: what a query can name, not the family names the parser reports). A dashboard
name missing from the exposition of a live router/operator (or from what the code can export) is a panel
that will stay empty.

The PromQL reading is deliberately plain, not a parser: string literals, label matchers `{...}`, range and
subquery selectors `[...]` and grouping clauses (`by (...)`, `without (...)`, `on (...)`, `ignoring (...)`,
`group_left (...)`, `group_right (...)`) are removed; what remains is an identifier unless it is followed by
`(` (a function or aggregation), is a PromQL keyword, a Grafana `$variable`, or part of a number or duration.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
# An identifier not glued to a number, a `$variable` or another name (`1e3`, `5m`, `$__range`, `a.b`).
_IDENT = re.compile(r"(?<![\w.$:])[A-Za-z_:][A-Za-z0-9_:]*(?![\w:])")
_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "atan2",
        "inf",
        "nan",
    }
)
_LABEL_VALUES = re.compile(r"\blabel_values\s*\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*[{,]")


def expr_metric_names(expr: str) -> set[str]:
    """The metric names one PromQL expression selects."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        word = match.group()
        if word.lower() in _KEYWORDS or re.match(r"\s*\(", text[match.end() :]):
            continue
        names.add(word)
    return names


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])  # a collapsed row keeps its panels inside


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every panel target's `expr`, in panel order."""
    return [
        target["expr"]
        for panel in _panels(dashboard.get("panels") or [])
        for target in panel.get("targets") or []
        if target.get("expr")
    ]


def _variable_queries(dashboard: dict[str, Any]) -> Iterator[str]:
    for variable in (dashboard.get("templating") or {}).get("list") or []:
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        if isinstance(query, dict):  # newer Grafana: {"query": "...", "refId": ...}
            query = query.get("query")
        if isinstance(query, str):
            yield query


def dashboard_metric_names(path: str | Path) -> set[str]:
    """The metric names every panel (and every `label_values` template variable) of the dashboard queries."""
    dashboard = json.loads(Path(path).read_text())
    names: set[str] = set()
    for expr in dashboard_exprs(dashboard):
        names |= expr_metric_names(expr)
    for query in _variable_queries(dashboard):
        names.update(m.group(1) for m in _LABEL_VALUES.finditer(query))
    return names


def exported_names(exposition_text: str) -> set[str]:
    """The sample names of a Prometheus text exposition (`foo_total`, `foo_bucket`, `foo_sum`, `foo_count`)."""
    return {sample.name for family in text_string_to_metric_families(exposition_text) for sample in family.samples}
