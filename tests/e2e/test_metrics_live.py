"""A real `loraswap serve` after classify and chat traffic: every documented metric family has samples in
/metrics, and those that traffic feeds (queue waits, batches, loads, evictions, loaded adapters) count it."""

from __future__ import annotations

import httpx
from e2e.tiny_world import build_world, env_for
from live import live_server
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import METRIC_NAMES


def family_name(name: str) -> str:
    """The parser's family name: counters lose `_total`."""
    return name.removesuffix("_total")


def test_every_documented_family_has_samples_after_traffic(tmp_path):
    world = build_world(tmp_path)
    env = env_for(world, LORASWAP_MAX_GPU_ADAPTERS="1")  # one slot per engine: a second adapter evicts
    with live_server(world["registry_dir"], env=env) as url:
        for adapter in ("sentiment", "intent", "sentiment", str(world["encoder"])):
            resp = httpx.post(f"{url}/v1/classify", json={"adapter": adapter, "inputs": ["great movie", "w1"]},
                              timeout=60)
            assert resp.status_code == 200, resp.text
        for model in ("alpha", world["decoder"]):
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            assert resp.status_code == 200, resp.text
        text = httpx.get(f"{url}/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in METRIC_NAMES:
        if name.startswith("loraswap_shadow_"):  # need a shadow alias: tests/e2e/test_rollout_live.py
            continue
        assert families.get(family_name(name)) and families[family_name(name)].samples, name

    def count(family: str, **labels) -> float:
        return sum(s.value for s in families[family].samples
                   if s.name == family + "_count" and all(s.labels.get(k) == v for k, v in labels.items()))

    assert count("loraswap_queue_wait_seconds", adapter="sentiment", task="classification") == 2
    assert count("loraswap_queue_wait_seconds", adapter="intent", task="classification") == 1
    assert count("loraswap_queue_wait_seconds", adapter="alpha", task="generation") == 1
    assert count("loraswap_queue_wait_seconds", task="generation") == 2
    assert count("loraswap_batch_size", task="classification") >= 4
    assert count("loraswap_batch_size", task="generation") >= 2
    evictions = {s.labels["adapter"]: s.value for s in families["loraswap_adapter_evictions"].samples
                 if s.name.endswith("_total")}
    assert evictions == {"sentiment": 1.0, "intent": 1.0}  # sentiment -> intent -> sentiment in one slot
    loaded = {(s.labels["adapter_name"], s.labels["level"]) for s in families["vllm:lora_adapter_loaded"].samples
              if s.value == 1}
    assert {("sentiment", "gpu"), ("alpha", "gpu"), ("intent", "cpu"), ("sentiment", "cpu")} <= loaded
    assert ("intent", "gpu") not in loaded
    assert families["vllm:num_gpu_loaded_lora_adapters"].samples[0].value == 2
    assert families["vllm:num_cpu_loaded_lora_adapters"].samples[0].value == 3
    resident = {s.labels["tier"]: s.value for s in families["loraswap_adapters_resident"].samples}
    assert resident == {"device": 2.0, "host": 3.0}
