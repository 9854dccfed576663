"""promtool `check metrics`-style rules over the exposition of service/metrics.py.

The rules are written here (promtool is a Go binary we do not ship). The `vllm:` families are an
external contract copied from vLLM and exempt from the naming rules (not from structure rules).
"""

from __future__ import annotations

import math
import re

from prometheus_client.parser import text_string_to_metric_families

from service.metrics import Metrics

SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
LABEL = re.compile(r"^[a-z][a-z0-9_]*$")
LEGAL_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
# Units that are not base units, or abbreviated: promtool wants seconds, bytes, ratios.
NON_BASE_UNITS = {
    "ms",
    "msec",
    "millis",
    "milliseconds",
    "us",
    "microseconds",
    "ns",
    "nanoseconds",
    "sec",
    "secs",
    "min",
    "mins",
    "minutes",
    "hours",
    "days",
    "kb",
    "mb",
    "gb",
    "kilobytes",
    "megabytes",
    "gigabytes",
    "bits",
    "percent",
    "perc",
    "pct",
}
TIME_WORDS = ("duration", "latency", "wait", "time", "load")
TYPE_WORDS = {"counter", "gauge", "histogram", "summary"}
EXTERNAL = ("vllm:",)


def lint(text: str) -> list[str]:
    """Problems in a text-format (0.0.4) exposition, one string each."""
    problems: list[str] = []
    helps: dict[str, str] = {}
    types: dict[str, str] = {}
    samples: dict[str, list[tuple[str, dict, float]]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, doc = line[7:].partition(" ")
            helps[name] = doc
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            if name not in helps:
                problems.append(f"{name}: TYPE before HELP / no HELP")
            types[name] = kind
        elif line and not line.startswith("#"):
            sample_name = re.match(r"[^{\s]+", line).group(0)
            family = next(
                (
                    f
                    for f in sorted(types, key=len, reverse=True)
                    if sample_name == f
                    or (types[f] == "histogram" and sample_name in (f + "_bucket", f + "_sum", f + "_count"))
                ),
                None,
            )
            if family is None:
                problems.append(f"{sample_name}: sample without a declared family")
                continue
            samples.setdefault(family, [])
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        samples[name] = [(s.name, s.labels, s.value) for s in family.samples]

    for name, kind in types.items():
        if not helps.get(name, "").strip():
            problems.append(f"{name}: no HELP text")
        if not LEGAL_NAME.match(name):
            problems.append(f"{name}: illegal metric name")
        if not name.startswith(EXTERNAL):
            if not SNAKE.match(name):
                problems.append(f"{name}: not snake_case")
            words = name.split("_")
            if kind == "counter" and not name.endswith("_total"):
                problems.append(f"{name}: counter without _total suffix")
            if kind != "counter" and name.endswith("_total"):
                problems.append(f"{name}: non-counter with _total suffix")
            if set(words) & NON_BASE_UNITS:
                problems.append(f"{name}: non-base or abbreviated unit {sorted(set(words) & NON_BASE_UNITS)}")
            if set(words) & TYPE_WORDS:
                problems.append(f"{name}: type in the name")
            unit_words = [w for w in words if w in ("seconds", "bytes", "ratio")]
            core = words[:-1] if kind == "counter" else words
            if unit_words and core[-1] not in ("seconds", "bytes", "ratio", "info"):
                problems.append(f"{name}: unit is not the suffix")
            if kind == "histogram" and any(w in TIME_WORDS for w in words) and words[-1] != "seconds":
                problems.append(f"{name}: a time histogram should end in _seconds")
        for _sample_name, labels, value in samples.get(name, []):
            for label in labels:
                if not LABEL.match(label) or label.startswith("__"):
                    problems.append(f"{name}: bad label name {label!r}")
            if "le" in labels and kind != "histogram":
                problems.append(f"{name}: 'le' label on a {kind}")
            if kind == "counter" and value < 0:
                problems.append(f"{name}: negative counter")
        if kind == "histogram":
            problems += _histogram_problems(name, samples.get(name, []))
    return problems


def _histogram_problems(name: str, samples: list) -> list[str]:
    problems = []
    series: dict[tuple, dict] = {}
    for sample_name, labels, value in samples:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        entry = series.setdefault(key, {"buckets": [], "sum": None, "count": None})
        if sample_name == name + "_bucket":
            entry["buckets"].append((float(labels["le"]), value))
        elif sample_name == name + "_sum":
            entry["sum"] = value
        elif sample_name == name + "_count":
            entry["count"] = value
    for key, entry in series.items():
        buckets = sorted(entry["buckets"])
        if not buckets or not math.isinf(buckets[-1][0]):
            problems.append(f"{name}{dict(key)}: no le=+Inf bucket")
        if entry["sum"] is None or entry["count"] is None:
            problems.append(f"{name}{dict(key)}: missing _sum or _count")
        counts = [c for _, c in buckets]
        if counts != sorted(counts):
            problems.append(f"{name}{dict(key)}: buckets not cumulative")
        if buckets and entry["count"] is not None and buckets[-1][1] != entry["count"]:
            problems.append(f"{name}{dict(key)}: +Inf bucket != _count")
    return problems


def busy_metrics() -> Metrics:
    m = Metrics(max_adapter_labels=3)
    for i, adapter in enumerate(["a", "b", "base-model", "d", "e"]):
        m.observe_request(adapter, "classification", 200, 0.003 * i)
        m.observe_request(adapter, "generation", 503, 2.0)
        m.observe_queue_wait(adapter, "generation", 0.002)
        m.observe_ttft(adapter, 0.1)
        m.observe_itl(adapter, 0.01)
        m.add_tokens(adapter, "prompt", 5)
        m.add_tokens(adapter, "generated", 2)
        m.observe_adapter_load(adapter, "registry", 3.0)
        m.count_eviction(adapter)
    m.set_resident("device", 3)
    m.observe_batch("generation", 8, 3)
    m.set_engine_state(
        "generation", 1, 2, kv_usage=0.5, running_adapters=["a"], waiting_adapters=["b"], max_lora=4
    )
    return m


def test_exposition_passes_the_rules():
    assert lint(busy_metrics().exposition()[0].decode()) == []


def test_empty_exposition_passes_the_rules():
    assert lint(Metrics().exposition()[0].decode()) == []


def test_the_rules_catch_bad_metrics():
    bad = "\n".join(
        [
            "# TYPE loraswap_requests counter",
            "loraswap_requests 1",
            "# HELP loraswap_queue_total Queue.",
            "# TYPE loraswap_queue_total gauge",
            "loraswap_queue_total 1",
            "# HELP loraswap_load_time_ms Load.",
            "# TYPE loraswap_load_time_ms histogram",
            'loraswap_load_time_ms_bucket{le="1.0"} 2',
            'loraswap_load_time_ms_bucket{le="+Inf"} 1',
            "loraswap_load_time_ms_count 1",
            "loraswap_load_time_ms_sum 1",
            "# HELP loraswapBatchSize Batch.",
            "# TYPE loraswapBatchSize gauge",
            "loraswapBatchSize 3",
            "# HELP loraswap_wait_seconds_max Max.",
            "# TYPE loraswap_wait_seconds_max gauge",
            "loraswap_wait_seconds_max 3",
            "",
        ]
    )
    problems = "\n".join(lint(bad))
    for expected in [
        "loraswap_requests: TYPE before HELP",
        "loraswap_requests: counter without _total suffix",
        "loraswap_queue_total: non-counter with _total suffix",
        "loraswap_load_time_ms: non-base or abbreviated unit",
        "loraswap_load_time_ms: a time histogram should end in _seconds",
        "buckets not cumulative",
        "loraswapBatchSize: not snake_case",
        "loraswap_wait_seconds_max: unit is not the suffix",
    ]:
        assert expected in problems, (expected, problems)


def test_vllm_names_are_the_only_exception():
    text = busy_metrics().exposition()[0].decode()
    declared = re.findall(r"^# TYPE (\S+) ", text, re.M)
    exempt = [n for n in declared if not SNAKE.match(n)]
    assert exempt and all(n.startswith("vllm:") for n in exempt)
