"""Everything a request handler needs, built once per app: settings, registry, engines, managers.

`start()` loads the bases (in a thread, so the event loop stays free) and `stop()` drains them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from adapters.registry import Registry
from service.adapter_cache import AdapterManager
from service.config import Settings

log = logging.getLogger("loraswap.server")


@dataclass
class ServiceContext:
    settings: Settings
    registry: Registry | None = None
    metrics: Any = None
    classifier: Any = None
    batcher: Any = None
    generator: Any = None
    managers: dict[str, AdapterManager] = field(default_factory=dict)
    ready: bool = False
    draining: bool = False
    in_flight: int = 0
    _tasks: list[asyncio.Task] = field(default_factory=list)

    def base_id(self, task: str) -> str | None:
        return {"classification": self.settings.encoder_base, "generation": self.settings.decoder_base}[task] or None

    async def start(self, classifier=None, generator=None, registry=None) -> None:
        s = self.settings
        self.registry = registry or Registry(s.registry)
        self.metrics = _make_metrics(s)
        if classifier is None and s.encoder_base:
            classifier = await asyncio.to_thread(_build_classifier, s)
        if classifier is not None:
            from service.engine.batcher import ClassifyBatcher

            self.classifier = classifier
            self.batcher = ClassifyBatcher(classifier, max_batch_size=s.max_batch_size,
                                           max_batch_tokens=s.max_batch_tokens, max_wait_ms=s.max_wait_ms,
                                           max_queue=s.max_queue, on_batch=self._on_classify_batch,
                                           max_tenant_tokens=s.max_tenant_tokens,
                                           shared_batch_tokens=s.shared_batch_tokens)
            await self.batcher.start()
            labels = _base_labels(classifier)
            self.managers["classification"] = self._manager(classifier, labels)
        if generator is None and s.decoder_base:
            generator = await asyncio.to_thread(_build_generator, s)
        if generator is not None:
            self.generator = generator
            self.managers["generation"] = self._manager(generator, None)
        for ref in s.preload:
            await self.load(ref)
        if s.watch_interval_s > 0:
            for manager in self.managers.values():
                self._tasks.append(asyncio.create_task(manager.watch(s.watch_interval_s)))
        self.ready = True

    def _manager(self, engine, labels) -> AdapterManager:
        s = self.settings
        return AdapterManager(engine, self.registry, base_ids={self.base_id(engine.task) or ""} - {""},
                              base_labels=labels, max_cpu_adapters=s.max_cpu_adapters,
                              max_concurrent_loads=s.max_concurrent_loads, load_on_demand=s.load_on_demand,
                              metrics=self.metrics, on_residency_change=self._update_residency)

    def _update_residency(self) -> None:
        totals: dict[str, int] = {}
        for manager in self.managers.values():
            for tier, n in manager.residency().items():
                totals[tier] = totals.get(tier, 0) + n
        for tier, n in totals.items():
            self.metrics.set_resident(tier, n)

    def update_engine_gauges(self) -> None:
        """Refresh the engine gauges; called at scrape time so the hot path does no extra work."""
        if self.batcher is not None:
            m = self.managers["classification"]
            self.metrics.set_engine_state("classification", self.batcher.running, self.batcher.queue_depth,
                                          running_adapters=m.running_adapters(),
                                          max_lora=self.classifier.num_slots - 1)
        if self.generator is not None:
            m, g = self.managers["generation"], self.generator
            self.metrics.set_engine_state("generation", g.running, g.waiting, kv_usage=g.kv_cache_usage,
                                          running_adapters=m.running_adapters(), max_lora=g.num_slots - 1)

    async def load(self, ref: str | None = None, path: str | None = None):
        """Load by registry ref or path into the manager of the adapter's task."""
        from adapters.manifest import Manifest

        if path is not None:
            task = (await asyncio.to_thread(Manifest.load, path)).task
        else:
            name, version = await asyncio.to_thread(self.registry.resolve, ref)
            task = (await asyncio.to_thread(self.registry.manifest, name, version)).task
        manager = self.managers.get(task)
        if manager is None:
            from adapters.errors import AdapterConflictError

            raise AdapterConflictError(f"this server has no {task} base model configured")
        return task, await manager.load(ref=ref, path=path)

    def _on_classify_batch(self, size: int, distinct: int, queue_wait_s: list[float]) -> None:
        self.metrics.observe_batch("classification", size, distinct)

    async def stop(self) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
        if self.batcher is not None:
            await self.batcher.stop()
        if self.generator is not None and hasattr(self.generator, "stop"):
            await asyncio.to_thread(self.generator.stop)


def _make_metrics(s: Settings):
    from service.metrics import Metrics

    bases = [b for b in (s.encoder_base, s.decoder_base) if b]
    return Metrics(max_adapter_labels=s.metrics.max_adapter_labels, always_labelled=bases)


def _base_labels(classifier) -> list[str]:
    id2label = getattr(classifier.model.config, "id2label", None) or {}
    return [id2label[i] for i in sorted(id2label)] if id2label else None


def _build_classifier(s: Settings):
    from adapters.bases import load_base
    from adapters.fingerprint import describe_base
    from service.engine.classifier import ClassifierEngine

    device, precision = s.resolved_device(), s.resolved_precision("classification")
    model, tokenizer = load_base(s.encoder_base, "classification", dtype=precision.dtype, device=device)
    info = describe_base(model, s.encoder_base, "classification")
    log.info("encoder base %s loaded on %s, %s", s.encoder_base, device, precision)
    return ClassifierEngine(model, tokenizer, info, num_slots=s.max_gpu_adapters + 1, max_rank=s.max_rank,
                            device=device, dtype=precision.dtype, max_length=s.max_length,
                            quantization=precision.quantization)


def _build_generator(s: Settings):
    try:
        from service.engine.generator import GeneratorEngine
    except ImportError:  # generation engine not installed in this build
        log.warning("generation engine unavailable; serving classification only")
        return None
    from adapters.bases import load_base
    from adapters.fingerprint import describe_base

    device, precision = s.resolved_device(), s.resolved_precision("generation")
    model, tokenizer = load_base(s.decoder_base, "generation", dtype=precision.dtype, device=device)
    info = describe_base(model, s.decoder_base, "generation")
    log.info("decoder base %s loaded on %s, %s", s.decoder_base, device, precision)
    return GeneratorEngine(model, tokenizer, info, num_slots=s.max_gpu_adapters + 1, max_rank=s.max_rank,
                           max_num_seqs=s.max_num_seqs, max_model_len=s.max_model_len, device=device,
                           dtype=precision.dtype, quantization=precision.quantization, cuda_graphs=s.cuda_graphs,
                           max_tenant_tokens=s.max_tenant_tokens)
