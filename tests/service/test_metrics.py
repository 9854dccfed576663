"""service/metrics.py: every DESIGN.md metric exposed with its type and labels, counts right,
adapter label cap, thread safety, vLLM gauges as the Gateway API Inference Extension reads them."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter as Tally
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import METRIC_NAMES, OTHER_ADAPTER, Metrics

# family name as the parser reports it (counters lose `_total`) -> (type, label names)
EXPECTED = {
    "loraswap_requests": ("counter", {"adapter", "task", "status"}),
    "loraswap_request_duration_seconds": ("histogram", {"adapter", "task"}),
    "loraswap_queue_wait_seconds": ("histogram", {"adapter", "task"}),
    "loraswap_time_to_first_token_seconds": ("histogram", {"adapter"}),
    "loraswap_inter_token_latency_seconds": ("histogram", {"adapter"}),
    "loraswap_tokens": ("counter", {"adapter", "kind"}),
    "loraswap_adapter_load_seconds": ("histogram", {"tier"}),
    "loraswap_adapter_loads": ("counter", {"adapter", "result"}),
    "loraswap_adapter_evictions": ("counter", {"adapter"}),
    "loraswap_adapters_resident": ("gauge", {"tier"}),
    "loraswap_batch_size": ("histogram", {"task"}),
    "loraswap_batch_distinct_adapters": ("histogram", {"task"}),
    "loraswap_engine_running_requests": ("gauge", {"task"}),
    "loraswap_engine_waiting_requests": ("gauge", {"task"}),
    "loraswap_shadow_requests": ("counter", {"adapter", "primary", "shadow", "result"}),
    "loraswap_shadow_rows": ("counter", {"adapter", "primary", "shadow", "outcome"}),
    "loraswap_shadow_divergence": ("histogram", {"adapter", "primary", "shadow", "measure"}),
    "loraswap_shadow_duration_seconds": ("histogram", {"adapter"}),
    "vllm:num_requests_running": ("gauge", set()),
    "vllm:num_requests_waiting": ("gauge", set()),
    "vllm:kv_cache_usage_perc": ("gauge", set()),
    "vllm:lora_requests_info": ("gauge", {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}),
    "vllm:lora_adapter_loaded": ("gauge", {"adapter_name", "level"}),
    "vllm:num_gpu_loaded_lora_adapters": ("gauge", set()),
    "vllm:num_cpu_loaded_lora_adapters": ("gauge", set()),
}

BASE = "SmolLM2-135M-Instruct"
ROOT = Path(__file__).resolve().parents[2]


def scrape(metrics: Metrics) -> dict:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def record_mixed_traffic(m: Metrics) -> Tally:
    """Classification and generation requests over three adapters and the base; returns the
    expected request count per (adapter, task, status)."""
    plan = Tally()
    for i in range(30):
        adapter = ["sentiment", "banking", BASE][i % 3]
        status = 200 if i % 5 else 429
        m.observe_request(adapter, "classification", status, 0.004)
        m.observe_queue_wait(adapter, "classification", 0.001)
        plan[(adapter, "classification", str(status))] += 1
    for i in range(12):
        adapter = ["support", BASE][i % 2]
        status = 200 if i % 4 else 500
        m.observe_request(adapter, "generation", status, 1.5)
        m.observe_queue_wait(adapter, "generation", 0.02)
        m.observe_ttft(adapter, 0.08)
        for _ in range(3):
            m.observe_itl(adapter, 0.012)
        m.add_tokens(adapter, "prompt", 20)
        m.add_tokens(adapter, "generated", 4)
        plan[(adapter, "generation", str(status))] += 1
    m.observe_adapter_load("sentiment", "registry", 2.3)
    m.observe_adapter_load("banking", "host", 0.004)
    m.observe_adapter_load("broken", "registry", 0.1, result="invalid")
    m.count_eviction("banking")
    m.set_resident("device", 2)
    m.set_resident("host", 5)
    m.set_loaded_adapters({"gpu": {"sentiment", "banking"}, "cpu": {"sentiment", "banking", "support"}})
    m.observe_shadow("sentiment", 1, 2, "classification", 0.01, 4, 3, {"kl": [0.1] * 4, "tv": [0.05] * 4})
    m.count_shadow_drop("sentiment", 1, 2, "OverloadedError")
    m.observe_batch("classification", 16, 3)
    m.observe_batch("generation", 4, 2)
    m.set_engine_state("classification", 3, 7)
    m.set_engine_state(
        "generation",
        2,
        1,
        kv_usage=0.25,
        running_adapters=["support"],
        waiting_adapters=["support"],
        max_lora=8,
    )
    return plan


def test_every_documented_metric_has_its_type_and_labels():
    m = Metrics()
    record_mixed_traffic(m)
    families = scrape(m)
    for name, (kind, labels) in EXPECTED.items():
        assert name in families, name
        family = families[name]
        assert family.type == kind, name
        assert family.documentation, name
        assert family.samples, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)
    extra = set(families) - set(EXPECTED)
    assert not extra, f"undocumented families: {extra}"


def test_metric_names_lists_every_exposed_family_in_promql_spelling():
    families = scrape(record_mixed_traffic(m := Metrics()) and m)
    exposed = {f.name + "_total" if f.type == "counter" else f.name for f in families.values()}
    assert set(METRIC_NAMES) == exposed
    assert len(METRIC_NAMES) == len(set(METRIC_NAMES))
    body = m.exposition()[0].decode()
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in body


def test_counters_equal_requests_recorded_per_adapter_and_status():
    m = Metrics()
    plan = record_mixed_traffic(m)
    families = scrape(m)
    got = {
        (s.labels["adapter"], s.labels["task"], s.labels["status"]): s.value
        for s in families["loraswap_requests"].samples
        if s.name == "loraswap_requests_total"
    }
    assert got == {k: float(v) for k, v in plan.items()}

    durations = {
        (s.labels["adapter"], s.labels["task"]): s.value
        for s in families["loraswap_request_duration_seconds"].samples
        if s.name.endswith("_count")
    }
    for (adapter, task), count in durations.items():
        assert count == sum(v for (a, t, _), v in plan.items() if (a, t) == (adapter, task))

    tokens = {(s.labels["adapter"], s.labels["kind"]): s.value for s in families["loraswap_tokens"].samples}
    assert tokens[("support", "prompt")] == 6 * 20
    assert tokens[("support", "generated")] == 6 * 4
    itl_count = [
        s.value
        for s in families["loraswap_inter_token_latency_seconds"].samples
        if s.name.endswith("_count") and s.labels["adapter"] == BASE
    ]
    assert itl_count == [18.0]

    loads = {
        (s.labels["adapter"], s.labels["result"]): s.value for s in families["loraswap_adapter_loads"].samples
    }
    assert loads == {("sentiment", "ok"): 1.0, ("banking", "ok"): 1.0, ("broken", "invalid"): 1.0}
    load_counts = {
        s.labels["tier"]: s.value
        for s in families["loraswap_adapter_load_seconds"].samples
        if s.name.endswith("_count")
    }
    assert load_counts == {"registry": 1.0, "host": 1.0}  # the refused load has no duration


def test_buckets_fit_the_ranges():
    families = scrape(record_mixed_traffic(m := Metrics()) and m)

    def bounds(name):
        return sorted(
            {float(s.labels["le"]) for s in families[name].samples if "le" in s.labels} - {float("inf")}
        )

    assert bounds("loraswap_queue_wait_seconds")[0] <= 0.001  # ms-range
    assert bounds("loraswap_inter_token_latency_seconds")[0] <= 0.001
    assert bounds("loraswap_request_duration_seconds")[0] <= 0.001  # classification in ms
    assert bounds("loraswap_request_duration_seconds")[-1] >= 30  # generation in s
    assert bounds("loraswap_adapter_load_seconds")[-1] >= 60  # remote registry fetches


def test_adapter_label_cap_folds_later_adapters_into_other():
    m = Metrics(max_adapter_labels=10, always_labelled=[BASE])
    names = [f"adapter-{i:02d}" for i in range(50)]
    for name in names:
        m.observe_request(name, "classification", 200, 0.01)
        m.add_tokens(name, "prompt", 1)
        m.count_eviction(name)
    m.observe_request(BASE, "classification", 200, 0.01)
    families = scrape(m)

    requests = {s.labels["adapter"]: s.value for s in families["loraswap_requests"].samples}
    # The base is pinned and counts as one of the 10: the first 9 adapters keep their names.
    assert set(requests) == {BASE, OTHER_ADAPTER, *names[:9]}
    assert requests[OTHER_ADAPTER] == 41
    assert sum(requests.values()) == 51
    for family in ("loraswap_tokens", "loraswap_adapter_evictions", "loraswap_request_duration_seconds"):
        labels = {s.labels["adapter"] for s in families[family].samples}
        assert len(labels - {OTHER_ADAPTER}) <= 10, family
    # A name seen before the cap was reached keeps its label afterwards.
    assert m.adapter_label("adapter-03") == "adapter-03"
    assert m.adapter_label("adapter-40") == OTHER_ADAPTER


def test_thread_safe_counts_and_cap():
    m = Metrics(max_adapter_labels=5)

    def worker(t):
        for i in range(500):
            m.observe_request(f"a{(t * 7 + i) % 20}", "generation", 200, 0.01)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    samples = scrape(m)["loraswap_requests"].samples
    assert sum(s.value for s in samples) == 2000
    assert len({s.labels["adapter"] for s in samples} - {OTHER_ADAPTER}) == 5


def test_vllm_gauges_aggregate_tasks_and_lora_info_is_a_timestamp():
    m = Metrics()
    before = time.time()
    m.set_engine_state("classification", 3, 7, running_adapters=["sentiment"], max_lora=32)
    m.set_engine_state(
        "generation",
        2,
        1,
        kv_usage=0.25,
        running_adapters=["support", "chat", "support"],
        waiting_adapters=["qa"],
        max_lora=8,
    )
    families = scrape(m)
    value = {
        name: families[name].samples[0].value
        for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
    }
    assert value == {
        "vllm:num_requests_running": 5,
        "vllm:num_requests_waiting": 8,
        "vllm:kv_cache_usage_perc": 0.25,
    }
    [info] = families["vllm:lora_requests_info"].samples
    assert info.labels == {
        "running_lora_adapters": "chat,sentiment,support",
        "waiting_lora_adapters": "qa",
        "max_lora": "40",
    }
    assert before <= info.value <= time.time() + 1

    # A new adapter set replaces the series (one series, newest timestamp): what the endpoint
    # picker reads from vLLM.
    m.set_engine_state("generation", 0, 0, kv_usage=0.0, max_lora=8)
    m.set_engine_state("classification", 0, 0, max_lora=32)
    [info] = scrape(m)["vllm:lora_requests_info"].samples
    assert info.labels == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "40"}
    per_task = {s.labels["task"]: s.value for s in scrape(m)["loraswap_engine_running_requests"].samples}
    assert per_task == {"classification": 0, "generation": 0}


def test_rejects_unknown_token_kind_and_bad_cap():
    m = Metrics()
    with pytest.raises(ValueError):
        m.add_tokens("a", "completion", 3)
    with pytest.raises(ValueError):
        Metrics(max_adapter_labels=0)


def test_many_instances_in_one_process_are_independent():
    a, b = Metrics(), Metrics()
    a.observe_request("x", "classification", 200, 0.01)
    assert scrape(b)["loraswap_requests"].samples == []
    assert len(scrape(a)["loraswap_requests"].samples) == 1


def test_openmetrics_on_request():
    m = Metrics()
    m.observe_request("x", "classification", 200, 0.01)
    body, content_type = m.exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    assert b"_created" not in body


WORKER = textwrap.dedent(
    """
    import sys
    from service.metrics import Metrics
    m = Metrics()
    role = sys.argv[1]
    if role == "write":
        for _ in range(int(sys.argv[2])):
            m.observe_request("sentiment", "classification", 200, 0.01)
        m.set_engine_state("generation", int(sys.argv[2]), 1, kv_usage=float(sys.argv[3]),
                           running_adapters=["a"], max_lora=4)
    else:
        sys.stdout.write(m.exposition()[0].decode())
    """
)


def test_multiprocess_mode_merges_workers(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"), "PYTHONPATH": str(ROOT)}
    (tmp_path / "prom").mkdir()

    def run(*args):
        return subprocess.run(
            [sys.executable, "-c", WORKER, *args],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout

    run("write", "3", "0.5")
    run("write", "4", "0.25")
    families = {f.name: f for f in text_string_to_metric_families(run("read"))}
    [requests] = families["loraswap_requests"].samples
    assert requests.value == 7
    # The writers have exited but were never marked dead, so the live* gauges still count them.
    assert families["vllm:num_requests_running"].samples[0].value == 7
    assert families["vllm:kv_cache_usage_perc"].samples[0].value == 0.5
    assert not [f for f in families if f.endswith("_created")]


def test_matches_the_dashboard_list_of_exported_metrics():
    """tests/deploy/metric_names.py (the Helm dashboard's list) and this module cannot drift."""
    path = ROOT / "tests" / "deploy" / "metric_names.py"
    if not path.exists():
        pytest.skip("tests/deploy/metric_names.py not present")
    spec = importlib.util.spec_from_file_location("_dashboard_metric_names", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    families = scrape(record_mixed_traffic(m := Metrics()) and m)
    exposed = {(f.name + "_total" if f.type == "counter" else f.name): f.type for f in families.values()}
    assert module.EXPORTED_METRICS == exposed
    assert set(module.EXPORTED_METRICS) == set(METRIC_NAMES)


def test_loaded_adapter_gauges_follow_the_tiers():
    """vllm:lora_adapter_loaded has one series per (adapter, level) loaded now; the counts agree; a name that
    left a tier leaves its series."""
    m = Metrics()
    m.set_loaded_adapters({"gpu": {"a", "b"}, "cpu": {"a", "b", "c"}})
    m.set_loaded_adapters({"gpu": {"a"}, "cpu": {"a", "c"}})
    families = scrape(m)
    loaded = {(s.labels["adapter_name"], s.labels["level"]): s.value
              for s in families["vllm:lora_adapter_loaded"].samples}
    assert loaded == {("a", "gpu"): 1.0, ("a", "cpu"): 1.0, ("c", "cpu"): 1.0}
    assert families["vllm:num_gpu_loaded_lora_adapters"].samples[0].value == 1
    assert families["vllm:num_cpu_loaded_lora_adapters"].samples[0].value == 2
    hidden = {f.name: f for f in text_string_to_metric_families(
        m.exposition(visible=lambda name: name != "a")[0].decode())}
    assert {s.labels["adapter_name"] for s in hidden["vllm:lora_adapter_loaded"].samples} == {"c"}
