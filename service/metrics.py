"""Prometheus metrics of the server: one `Metrics` object per app, owning its own registry.

Routers, the batcher, the generator and the adapter cache call its plain methods (any thread);
`GET /metrics` serves `exposition()`. Names and labels are the contract of DESIGN.md "Metrics".

Several worker processes (multiprocess mode)
--------------------------------------------
Each process normally exposes only its own counts. To serve one aggregate view from several
workers (``uvicorn --workers N`` or gunicorn), set ``PROMETHEUS_MULTIPROC_DIR`` to an empty,
writable directory *before the process starts* (prometheus_client decides at import time whether
values live in memory or in mmapped files there), wipe that directory on every deploy, and call
``mark_process_dead(pid)`` from the supervisor when a worker exits (gunicorn ``child_exit`` hook)
so that the ``live*`` gauges drop the dead worker. ``Metrics()`` reads the variable itself (or
takes ``multiprocess_dir=``); ``exposition()`` then merges the files of all workers: counters and
histograms are summed, request gauges are summed over live workers, KV-cache usage is the max.
Limitation: series cannot be removed in that mode, so every past adapter combination of
``vllm:lora_requests_info`` stays exposed with its old timestamp (vLLM has the same behaviour;
the endpoint picker reads the newest one).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest
from prometheus_client.metrics_core import Metric

PREFIX = "loraswap_"
OTHER_ADAPTER = "_other_"  # never a valid adapter name (names start with [a-z0-9])
TOKEN_KINDS = ("prompt", "generated")

# Buckets, in seconds. Classification requests, queue waits and decode steps live in the
# millisecond range; a generation request or a first token can take seconds; an adapter load
# ranges from a host->GPU copy (ms) to a fetch from a remote registry (tens of seconds).
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ADAPTER_LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DISTINCT_ADAPTER_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Shadow comparisons: total variation and cosine live in [0, 1] (near 0 and near 1 when versions agree).
DIVERGENCE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)
SHADOW_LABELS = ("adapter", "primary", "shadow")

# Every family name as it appears in the text exposition and in PromQL (histograms by their
# base name: query them as <name>_bucket / _sum / _count).
METRIC_NAMES: tuple[str, ...] = (
    "loraswap_requests_total",
    "loraswap_request_duration_seconds",
    "loraswap_queue_wait_seconds",
    "loraswap_time_to_first_token_seconds",
    "loraswap_inter_token_latency_seconds",
    "loraswap_tokens_total",
    "loraswap_adapter_load_seconds",
    "loraswap_adapter_loads_total",
    "loraswap_adapter_evictions_total",
    "loraswap_adapters_resident",
    "loraswap_batch_size",
    "loraswap_batch_distinct_adapters",
    "loraswap_engine_running_requests",
    "loraswap_engine_waiting_requests",
    "loraswap_shadow_requests_total",
    "loraswap_shadow_rows_total",
    "loraswap_shadow_divergence",
    "loraswap_shadow_duration_seconds",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:lora_requests_info",
    "vllm:lora_adapter_loaded",
    "vllm:num_gpu_loaded_lora_adapters",
    "vllm:num_cpu_loaded_lora_adapters",
)


def mark_process_dead(pid: int, multiprocess_dir: str | None = None) -> None:
    """Drop a dead worker's live gauges (multiprocess mode; call from the supervisor)."""
    path = multiprocess_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        multiprocess.mark_process_dead(pid, path)


LORA_INFO = "vllm:lora_requests_info"
LORA_LIST_LABELS = ("running_lora_adapters", "waiting_lora_adapters")
ADAPTER_LABELS = ("adapter", "adapter_name")  # labels whose value is one adapter's name
LOADED_LEVELS = ("gpu", "cpu")  # vLLM's names for our device and host tiers


class _ScrapeView:
    """Collector view of a registry for one scrape. Drops the `_created` samples (they double the
    series count, no dashboard reads them, and they would show up as extra gauge families) and, when
    `keep` is given (a key limited to some adapters), the series of the adapters it may not see:
    samples whose `adapter` label fails `keep`, and those names in vLLM's comma-joined LoRA lists."""

    def __init__(self, registry: CollectorRegistry, keep: Callable[[str], bool] | None = None):
        self._registry = registry
        self._keep = keep

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            samples = [s for s in family.samples if not s.name.endswith("_created")]
            if self._keep is not None:
                samples = self._visible(family.name, samples)
            family.samples = samples
            yield family

    def _visible(self, family: str, samples: list) -> list:
        keep = self._keep
        if family != LORA_INFO:
            return [s for s in samples if all(keep(s.labels[k]) for k in ADAPTER_LABELS if k in s.labels)]
        # Hidden names leave the lists; series that become alike (multiprocess mode keeps old ones)
        # merge into the newest, the one the endpoint picker reads.
        newest: dict[tuple, Any] = {}
        for s in samples:
            labels = {k: ",".join(n for n in v.split(",") if n and keep(n)) if k in LORA_LIST_LABELS else v
                      for k, v in s.labels.items()}
            ident = tuple(sorted(labels.items()))
            if ident not in newest or s.value > newest[ident].value:
                newest[ident] = s._replace(labels=labels)
        return list(newest.values())


class Metrics:
    """All metrics of one server. Thread-safe: prometheus_client children are, and the little
    state kept here (adapter label map, per-task engine state) sits behind one lock."""

    def __init__(
        self,
        *,
        max_adapter_labels: int = 100,
        always_labelled: Iterable[str] = (),
        multiprocess_dir: str | None = None,
    ) -> None:
        """`max_adapter_labels`: distinct `adapter` label values kept before folding into
        `_other_`; `always_labelled` (e.g. the base models' ids) are taken first and count toward
        that cap. `multiprocess_dir` defaults to $PROMETHEUS_MULTIPROC_DIR (see module doc)."""
        if max_adapter_labels < 1:
            raise ValueError("max_adapter_labels must be >= 1")
        self.max_adapter_labels = max_adapter_labels
        self._lock = threading.Lock()
        self._adapter_labels: set[str] = set()
        self.always_labelled = frozenset(always_labelled)  # shown to every key that may read metrics
        for name in self.always_labelled:
            self.adapter_label(name)

        self.multiprocess_dir = multiprocess_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        if self.multiprocess_dir and values.ValueClass is values.MutexValue:
            # prometheus_client picks where values live when it is imported: this process's own
            # values stay in memory, only the other workers' files get merged.
            warnings.warn(
                "PROMETHEUS_MULTIPROC_DIR was not set when prometheus_client was imported; "
                "this process's metrics are not written to the shared directory",
                RuntimeWarning,
                stacklevel=2,
            )
        # Metrics always register here; in multiprocess mode exposition reads the files instead.
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r)

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, registry=r, buckets=buckets)

        def gauge(name: str, doc: str, labels: tuple[str, ...], mode: str) -> Gauge:
            full = name if name.startswith("vllm:") else PREFIX + name
            return Gauge(full, doc, labels, registry=r, multiprocess_mode=mode)

        self.requests = counter(
            "requests_total",
            "Finished requests by adapter, task and HTTP status code.",
            ("adapter", "task", "status"),
        )
        self.request_duration = histogram(
            "request_duration_seconds",
            "End-to-end request duration (for streams: until the last token).",
            ("adapter", "task"),
            REQUEST_BUCKETS,
        )
        self.queue_wait = histogram(
            "queue_wait_seconds",
            "Time a request waited before its first engine step.",
            ("adapter", "task"),
            FAST_BUCKETS,
        )
        self.ttft = histogram(
            "time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            ("adapter",),
            TTFT_BUCKETS,
        )
        self.itl = histogram(
            "inter_token_latency_seconds",
            "Time between two generated tokens of one request.",
            ("adapter",),
            FAST_BUCKETS,
        )
        self.tokens = counter(
            "tokens_total",
            "Tokens processed, kind=prompt (input) or generated (output).",
            ("adapter", "kind"),
        )
        self.adapter_load = histogram(
            "adapter_load_seconds",
            "Time to make an adapter servable, by the tier it was loaded from "
            "(e.g. host = copy into a GPU slot, registry = fetch + validate + copy).",
            ("tier",),
            ADAPTER_LOAD_BUCKETS,
        )
        self.adapter_loads = counter(
            "adapter_loads_total",
            "Adapter load attempts by result (ok, or the reason it failed).",
            ("adapter", "result"),
        )
        self.adapter_evictions = counter(
            "adapter_evictions_total",
            "Adapters evicted from their slot by the LRU cache "
            "(per adapter: repeated evictions of one adapter show cache thrashing).",
            ("adapter",),
        )
        self.adapters_resident = gauge(
            "adapters_resident", "Adapters currently resident, by cache tier.", ("tier",), "livesum"
        )
        self.batch_size = histogram(
            "batch_size",
            "Rows (classification) or sequences (generation) per engine step.",
            ("task",),
            BATCH_SIZE_BUCKETS,
        )
        self.batch_distinct = histogram(
            "batch_distinct_adapters",
            "Distinct adapters in one engine step (the base model counts as one).",
            ("task",),
            DISTINCT_ADAPTER_BUCKETS,
        )
        self.engine_running = gauge(
            "engine_running_requests", "Requests in the engine's running batch.", ("task",), "livesum"
        )
        self.engine_waiting = gauge(
            "engine_waiting_requests", "Requests queued for the engine.", ("task",), "livesum"
        )

        self.shadow_requests = counter(
            "shadow_requests",
            "Requests copied to an adapter's shadow version, by result (ok, or why the copy was dropped).",
            (*SHADOW_LABELS, "result"),
        )
        self.shadow_rows = counter(
            "shadow_rows",
            "Inputs compared between primary and shadow version: outcome agree/disagree (top label, "
            "classification) or compared (embeddings).",
            (*SHADOW_LABELS, "outcome"),
        )
        self.shadow_divergence = histogram(
            "shadow_divergence",
            "Per input, primary vs shadow: measure=tv (total variation of scores), kl (KL(primary||shadow)),"
            " cosine (embeddings).",
            (*SHADOW_LABELS, "measure"),
            DIVERGENCE_BUCKETS,
        )
        self.shadow_duration = histogram(
            "shadow_duration_seconds",
            "Time a shadow copy took (queue + compute), to set beside the primary's request duration.",
            ("adapter",),
            REQUEST_BUCKETS,
        )

        # vLLM-compatible gauges, read by the Gateway API Inference Extension's endpoint picker.
        # They are unlabelled (one series, like a vLLM replica) and aggregate over the tasks.
        self.vllm_running = gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", (), "livesum"
        )
        self.vllm_waiting = gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", (), "livesum"
        )
        self.vllm_kv_usage = gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", (), "livemax"
        )
        # As vLLM: value = time of the last update (the picker keeps the newest series), labels =
        # comma-joined adapter names. Label order as in vLLM.
        self.vllm_lora_info = gauge(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            ("max_lora", "waiting_lora_adapters", "running_lora_adapters"),
            "livemostrecent",
        )

        # Adapters loaded whether or not requests use them (vLLM's proposed gauges): a LoRA-aware router
        # can then send an adapter's first request in a while to a replica that still holds it.
        self.vllm_lora_loaded = gauge(
            "vllm:lora_adapter_loaded",
            "1 for each LoRA adapter loaded, by level: gpu = in an engine slot (any device), cpu = host memory.",
            ("adapter_name", "level"),
            "livemax",
        )
        self.vllm_num_loaded = {
            level: gauge(f"vllm:num_{level}_loaded_lora_adapters",
                         f"LoRA adapters loaded at level {level} (see vllm:lora_adapter_loaded).", (), "livesum")
            for level in LOADED_LEVELS
        }
        self._loaded: set[tuple[str, str]] = set()

        self._engine_state: dict[
            str, tuple[int, int, float | None, tuple[str, ...], tuple[str, ...], int]
        ] = {}
        self._lora_labels: tuple[str, str, str] | None = None

    # -- adapter label cap -------------------------------------------------------------------

    def adapter_label(self, adapter: str | None) -> str:
        """The label value for `adapter`: its name while fewer than `max_adapter_labels` names
        have been seen (first come, first kept), else `_other_`. None/"" is `_other_` too."""
        if not adapter:
            return OTHER_ADAPTER
        labels = self._adapter_labels
        if adapter in labels:  # lock-free fast path: a set lookup is atomic under the GIL
            return adapter
        with self._lock:
            if adapter in labels:
                return adapter
            if len(labels) < self.max_adapter_labels:
                labels.add(adapter)
                return adapter
        return OTHER_ADAPTER

    # -- per request -------------------------------------------------------------------------

    def observe_request(self, adapter: str, task: str, status: int | str, seconds: float) -> None:
        """One finished request: counts it and records its duration. `status` is the HTTP code."""
        a = self.adapter_label(adapter)
        self.requests.labels(a, task, str(status)).inc()
        self.request_duration.labels(a, task).observe(max(0.0, seconds))

    def observe_queue_wait(self, adapter: str, task: str, seconds: float) -> None:
        self.queue_wait.labels(self.adapter_label(adapter), task).observe(max(0.0, seconds))

    def observe_ttft(self, adapter: str, seconds: float) -> None:
        self.ttft.labels(self.adapter_label(adapter)).observe(max(0.0, seconds))

    def observe_itl(self, adapter: str, seconds: float) -> None:
        self.itl.labels(self.adapter_label(adapter)).observe(max(0.0, seconds))

    def add_tokens(self, adapter: str, kind: str, n: int) -> None:
        """`kind` is "prompt" or "generated"."""
        if kind not in TOKEN_KINDS:
            raise ValueError(f"token kind must be one of {TOKEN_KINDS}, not {kind!r}")
        if n > 0:
            self.tokens.labels(self.adapter_label(adapter), kind).inc(n)

    # -- adapter cache -----------------------------------------------------------------------

    def observe_adapter_load(self, adapter: str, tier: str, seconds: float, result: str = "ok") -> None:
        """One load attempt; the duration is recorded for successful loads only, so a fast
        refusal does not pull the load-time distribution down."""
        self.adapter_loads.labels(self.adapter_label(adapter), result).inc()
        if result == "ok":
            self.adapter_load.labels(tier).observe(max(0.0, seconds))

    def count_eviction(self, adapter: str) -> None:
        self.adapter_evictions.labels(self.adapter_label(adapter)).inc()

    # -- shadow traffic ----------------------------------------------------------------------

    def observe_shadow(self, adapter: str, primary: int, shadow: int, task: str, seconds: float, rows: int,
                       agreements: int, measures: dict[str, list[float]]) -> None:
        """One compared shadow copy of `rows` inputs (service/shadow.py)."""
        labels = (self.adapter_label(adapter), str(primary), str(shadow))
        self.shadow_requests.labels(*labels, "ok").inc()
        if task == "classification":
            self.shadow_rows.labels(*labels, "agree").inc(agreements)
            self.shadow_rows.labels(*labels, "disagree").inc(rows - agreements)
        else:
            self.shadow_rows.labels(*labels, "compared").inc(rows)
        for measure, observed in measures.items():
            child = self.shadow_divergence.labels(*labels, measure)
            for value in observed:
                child.observe(value)
        self.shadow_duration.labels(labels[0]).observe(max(0.0, seconds))

    def count_shadow_drop(self, adapter: str, primary: int, shadow: int, reason: str) -> None:
        self.shadow_requests.labels(self.adapter_label(adapter), str(primary), str(shadow), reason).inc()

    def set_resident(self, tier: str, n: int) -> None:
        self.adapters_resident.labels(tier).set(n)

    def set_loaded_adapters(self, loaded: dict[str, set[str]]) -> None:
        """Adapter names per level ("gpu": device tier, "cpu": host tier); replaces the previous set."""
        with self._lock:
            now = {(name, level) for level in LOADED_LEVELS for name in loaded.get(level, ())}
            for labels in self._loaded - now:
                if self.multiprocess_dir:  # series cannot be removed there
                    self.vllm_lora_loaded.labels(*labels).set(0)
                else:
                    self.vllm_lora_loaded.remove(*labels)
            for labels in now - self._loaded:
                self.vllm_lora_loaded.labels(*labels).set(1)
            self._loaded = now
            for level in LOADED_LEVELS:
                self.vllm_num_loaded[level].set(len(loaded.get(level, ())))

    # -- engines -----------------------------------------------------------------------------

    def observe_batch(self, task: str, size: int, distinct: int) -> None:
        """One engine step: `size` rows/sequences, `distinct` adapters among them."""
        self.batch_size.labels(task).observe(size)
        self.batch_distinct.labels(task).observe(distinct)

    def set_engine_state(
        self,
        task: str,
        running: int,
        waiting: int,
        kv_usage: float | None = None,
        running_adapters: Iterable[str] = (),
        waiting_adapters: Iterable[str] = (),
        max_lora: int = 0,
    ) -> None:
        """The engine's state after a step. Feeds the per-task gauges and the vLLM gauges, which
        aggregate over tasks: running/waiting summed, KV usage = max of the engines that report
        one (0..1), LoRA info = union of adapter names (sorted, so that an unchanged set keeps
        its series) with max_lora summed. Pass adapter names only, never the base model."""
        self.engine_running.labels(task).set(running)
        self.engine_waiting.labels(task).set(waiting)
        with self._lock:
            self._engine_state[task] = (
                running,
                waiting,
                kv_usage,
                tuple(running_adapters),
                tuple(waiting_adapters),
                max_lora,
            )
            states = list(self._engine_state.values())
            self.vllm_running.set(sum(s[0] for s in states))
            self.vllm_waiting.set(sum(s[1] for s in states))
            usages = [s[2] for s in states if s[2] is not None]
            if usages:
                self.vllm_kv_usage.set(max(usages))
            labels = (
                str(sum(s[5] for s in states)),
                ",".join(sorted({a for s in states for a in s[4] if a})),
                ",".join(sorted({a for s in states for a in s[3] if a})),
            )
            if labels != self._lora_labels:
                # One series at a time (vLLM keeps every past combination; the picker reads the
                # newest, so dropping the stale ones is equivalent and bounds the cardinality).
                if self._lora_labels is not None and not self.multiprocess_dir:
                    self.vllm_lora_info.remove(*self._lora_labels)
                self._lora_labels = labels
            self.vllm_lora_info.labels(*labels).set(time.time())

    # -- scrape ------------------------------------------------------------------------------

    def _collector(self, visible: Callable[[str], bool] | None) -> Any:
        registry = self.registry
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        return _ScrapeView(registry, None if visible is None else self._keeper(visible))

    def _keeper(self, visible: Callable[[str], bool]) -> Callable[[str], bool]:
        """`visible`, asked once per distinct name in a scrape; `_other_` and the base models always pass."""
        decided = dict.fromkeys((OTHER_ADAPTER, *self.always_labelled), True)

        def keep(name: str) -> bool:
            if name not in decided:
                decided[name] = bool(visible(name))
            return decided[name]

        return keep

    def exposition(
        self, accept: str | None = None, visible: Callable[[str], bool] | None = None
    ) -> tuple[bytes, str]:
        """(body, content type) for GET /metrics. Prometheus text format 0.0.4 unless `accept`
        (the request's Accept header) asks for OpenMetrics. `visible` (an adapter name -> bool), when
        given, hides the series of the adapters it refuses (see `_ScrapeView`)."""
        collector = self._collector(visible)
        if accept:
            encoder, content_type = choose_encoder(accept)
            return encoder(collector), content_type
        return generate_latest(collector), CONTENT_TYPE_LATEST
