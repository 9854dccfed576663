"""The metric families the server exports (DESIGN.md, Metrics), with their Prometheus types.

One list, used by the dashboard test; a service test can check it against a live /metrics
exposition (`prometheus_client.parser.text_string_to_metric_families`) so the two cannot drift.
Names are as exposed: counters carry their `_total` suffix, histograms their base name.
"""

EXPORTED_METRICS: dict[str, str] = {
    "loraswap_requests_total": "counter",
    "loraswap_request_duration_seconds": "histogram",
    "loraswap_queue_wait_seconds": "histogram",
    "loraswap_time_to_first_token_seconds": "histogram",
    "loraswap_inter_token_latency_seconds": "histogram",
    "loraswap_tokens_total": "counter",
    "loraswap_adapter_load_seconds": "histogram",
    "loraswap_adapter_loads_total": "counter",
    "loraswap_adapter_evictions_total": "counter",
    "loraswap_adapters_resident": "gauge",
    "loraswap_batch_size": "histogram",
    "loraswap_batch_distinct_adapters": "histogram",
    "loraswap_engine_running_requests": "gauge",
    "loraswap_engine_waiting_requests": "gauge",
    "loraswap_shadow_requests_total": "counter",
    "loraswap_shadow_rows_total": "counter",
    "loraswap_shadow_divergence": "histogram",
    "loraswap_shadow_duration_seconds": "histogram",
    # vLLM-compatible gauges read by the Gateway API Inference Extension endpoint picker.
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:lora_requests_info": "gauge",
    "vllm:lora_adapter_loaded": "gauge",
    "vllm:num_gpu_loaded_lora_adapters": "gauge",
    "vllm:num_cpu_loaded_lora_adapters": "gauge",
}


def queryable_series() -> set[str]:
    """Series names PromQL can select: a histogram is queried through _bucket, _sum and _count."""
    names: set[str] = set()
    for name, kind in EXPORTED_METRICS.items():
        if kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(name)
    return names
