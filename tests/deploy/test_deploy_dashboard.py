"""The Grafana dashboard (helm/loraswap/dashboards/loraswap.json) queries only metrics the server exports."""

from __future__ import annotations

import json
import re

import pytest

# PromQL words that look like identifiers but are not metric names.
_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
}
# An identifier not glued to a number (the "m" of "5m" or "1e3" is not a name).
_IDENT = re.compile(r"(?<![A-Za-z0-9_:.$])[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names_in(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (a small lexer, enough for dashboard queries)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range / subquery windows
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    names = set()
    for match in _IDENT.finditer(text):
        word = match.group()
        following = text[match.end() :].lstrip()
        if following.startswith("(") or word.lower() in _PROMQL_WORDS:
            continue  # a function call or a keyword
        names.add(word)
    return names


def test_the_extractor_finds_metric_names():
    expr = (
        "histogram_quantile(0.99, sum by (adapter, le) (rate(loraswap_request_duration_seconds_bucket"
        '{adapter=~"$adapter", status!="ok"}[$__rate_interval]))) / on(pod) group_left vllm:num_requests_running'
        " + bogus_metric offset 5m"
    )
    assert metric_names_in(expr) == {
        "loraswap_request_duration_seconds_bucket",
        "vllm:num_requests_running",
        "bogus_metric",
    }


@pytest.fixture(scope="module")
def dashboard(chart_dir) -> dict:
    return json.loads((chart_dir / "dashboards" / "loraswap.json").read_text())


def _queries(dashboard: dict) -> list[tuple[str, str]]:
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable["type"] == "query" and query:
            found.append(
                (f"variable {variable['name']}", re.sub(r"^label_values\(([^,)]*)(,[^)]*)?\)$", r"\1", query))
            )
    return found


def test_every_query_names_only_exported_metrics(dashboard, exported_metrics):
    allowed = exported_metrics.queryable_series()
    queries = _queries(dashboard)
    assert len(queries) >= 20
    unknown = {
        f"{title}: {name}" for title, expr in queries for name in metric_names_in(expr) if name not in allowed
    }
    assert not unknown, f"metrics not in metric_names.EXPORTED_METRICS: {sorted(unknown)}"


# Each required panel: a title fragment and the metrics it must query.
REQUIRED_PANELS = {
    "Requests/s by adapter": {"loraswap_requests_total"},
    "Latency p50 by adapter": {"loraswap_request_duration_seconds_bucket"},
    "Latency p99 by adapter": {"loraswap_request_duration_seconds_bucket"},
    "Queue depth": {"loraswap_engine_waiting_requests"},
    "Batch size": {"loraswap_batch_size_sum", "loraswap_batch_size_count", "loraswap_batch_size_bucket"},
    "Distinct adapters per batch": {"loraswap_batch_distinct_adapters_bucket"},
    "Adapter loads/s by result, evictions/s": {
        "loraswap_adapter_loads_total",
        "loraswap_adapter_evictions_total",
    },
    "Resident adapters by tier": {"loraswap_adapters_resident"},
    "Tokens/s by kind": {"loraswap_tokens_total"},
    "Time to first token": {"loraswap_time_to_first_token_seconds_bucket"},
    "Inter-token latency": {"loraswap_inter_token_latency_seconds_bucket"},
    "Shadow agreement by adapter": {"loraswap_shadow_rows_total"},
    "Shadow divergence": {"loraswap_shadow_divergence_sum", "loraswap_shadow_divergence_count",
                          "loraswap_shadow_requests_total"},
}


def test_required_panels_are_there(dashboard):
    by_title: dict[str, set[str]] = {}
    for title, expr in _queries(dashboard):
        by_title.setdefault(title, set()).update(metric_names_in(expr))
    for fragment, metrics in REQUIRED_PANELS.items():
        titles = [t for t in by_title if t.startswith(fragment)]
        assert titles, f"no panel titled {fragment!r}"
        assert metrics <= by_title[titles[0]], (fragment, by_title[titles[0]])
    quantiles = " ".join(expr for title, expr in _queries(dashboard) if title.startswith("Latency p99"))
    assert "histogram_quantile(0.99" in quantiles and "by (adapter, le)" in quantiles


def test_panels_are_well_formed(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "loraswap"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
