"""Everything a request handler needs, built once per app: settings, registry, metrics, engines, routers.

`start()` loads the bases (in a thread, so the event loop stays free) and starts the engines; `stop()`
drains them. Each adapter task maps to the engine that serves it; tasks that share an engine share its
router (and so its slot pool and host cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from adapters.errors import AdapterConflictError, AdapterNotFoundError
from adapters.manifest import Manifest
from adapters.ref import AdapterRef
from adapters.registry import Registry
from service.config import Settings
from service.engine.protocol import Engine, StepObserver
from service.errors import APIError
from service.host_cache import HostCache
from service.metrics import Metrics
from service.router import AdapterRouter, Lease, Residency
from service.shadow import ShadowTraffic
from service.slot_pool import Resident

log = logging.getLogger("loraswap.server")

# Which base setting names a task's base model (its id is what `model`/`adapter` gives for "no adapter").
BASE_SETTING = {"classification": "encoder_base", "embedding": "encoder_base", "generation": "decoder_base"}


@dataclass
class ServiceContext:
    settings: Settings
    registry: Registry | None = None
    metrics: Metrics | None = None
    engines: dict[str, Engine] = field(default_factory=dict)  # task -> engine
    routers: dict[str, AdapterRouter] = field(default_factory=dict)  # task -> its engine's router
    ready: bool = False
    draining: bool = False
    in_flight: int = 0
    shadows: ShadowTraffic = field(default_factory=ShadowTraffic)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    def base_id(self, task: str) -> str | None:
        return getattr(self.settings, BASE_SETTING[task]) or None

    async def start(self, engines: list[Engine], registry: Registry | None = None) -> None:
        """Serve `engines` (built by `build_engines` or given by tests), then preload and watch."""
        s = self.settings
        self.registry = registry or Registry(s.registry)
        self.metrics = Metrics(max_adapter_labels=s.metrics.max_adapter_labels,
                               always_labelled=[b for b in (s.encoder_base, s.decoder_base) if b])
        self.shadows = ShadowTraffic(self.metrics)
        for engine in engines:
            await engine.start(s, on_step=self._step_observer(min(engine.tasks)))
            router = self._router(engine)
            for task in engine.tasks:
                self.engines[task], self.routers[task] = engine, router
        for ref in s.preload:
            await self.load(ref)
        if s.watch_interval_s > 0:
            self._tasks += [asyncio.create_task(r.watch(s.watch_interval_s)) for r in self.distinct_routers()]
        self.ready = True

    def _step_observer(self, task: str) -> StepObserver:
        metrics = self.metrics
        return lambda size, distinct: metrics.observe_batch(task, size, distinct)

    def _router(self, engine: Engine) -> AdapterRouter:
        s = self.settings
        host = HostCache.for_engine(engine, s.max_cpu_adapters)
        bases = {self.base_id(task) for task in engine.tasks} - {None}
        return AdapterRouter(engine, self.registry, host, base_ids=bases, base_labels=engine.base_labels,
                             max_concurrent_loads=s.max_concurrent_loads, load_on_demand=s.load_on_demand,
                             metrics=self.metrics, on_residency_change=self._update_residency)

    def distinct_routers(self) -> list[AdapterRouter]:
        return list(dict.fromkeys(self.routers.values()))

    # ---- requests -------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lease(self, task: str, model: str, route_key: str | None = None) -> AsyncIterator[Lease]:
        """The slot to run `model` (an adapter ref of `task`, or the base's id) on, held until the block
        ends: `lease.slot`, `lease.name` (None for the base), `lease.version`, `lease.labels`. `route_key`
        keeps one caller on one version while a canary takes a share of the name's traffic."""
        async with self.router(task).lease(model, task, route_key) as lease:
            yield lease

    def router(self, task: str) -> AdapterRouter:
        router = self.routers.get(task)
        if router is None:
            raise APIError(404, f"this server has no {task} base model", code="task_unavailable")
        return router

    # ---- management -----------------------------------------------------------------------------
    async def load(self, ref: str | None = None, path: str | None = None) -> tuple[str, Resident]:
        """Load by registry ref (resolved here, once) or folder into the router of the adapter's task."""
        if path is not None:
            task = (await asyncio.to_thread(Manifest.load, path)).task
            router = self._task_router(task)
            weights = await router.read_path(Path(path))
            key = (weights.manifest.name, weights.manifest.version)
            return task, await router.load(key, path=Path(path), weights=weights)
        parsed = AdapterRef.parse(ref)
        key = await asyncio.to_thread(self.registry.resolve, parsed)
        task = (await asyncio.to_thread(self.registry.manifest, *key)).task
        return task, await self._task_router(task).load(key, parsed if parsed.version is None else None)

    def _task_router(self, task: str) -> AdapterRouter:
        router = self.routers.get(task)
        if router is None:
            raise AdapterConflictError(f"this server has no {task} base model configured")
        return router

    async def unload(self, name: str) -> None:
        for router in self.distinct_routers():
            if router.serves(name):
                return await router.unload(name)
        raise AdapterNotFoundError(f"adapter {name!r} is not loaded")

    async def refresh(self) -> None:
        """Re-resolve every followed name now (after an alias move)."""
        for router in self.distinct_routers():
            await router.refresh()

    def residency(self) -> list[Residency]:
        return [row for router in self.distinct_routers() for row in router.residency()]

    # ---- metrics --------------------------------------------------------------------------------
    def _update_residency(self) -> None:
        loaded: dict[str, set[str]] = {"gpu": set(), "cpu": set()}
        for router in self.distinct_routers():
            for level, names in router.loaded().items():
                loaded[level].update(names)
        counts = {"device": 0, "host": 0}
        for router in self.distinct_routers():
            counts["device"] += len(router.pool.residents())
            counts["host"] += len(router.host)
        for tier, n in counts.items():
            self.metrics.set_resident(tier, n)
        self.metrics.set_loaded_adapters(loaded)

    def update_engine_gauges(self) -> None:
        """Refresh the engine gauges; called at scrape time so the hot path does no extra work. An engine
        serving several tasks reports under the first of them (alphabetically)."""
        for router in self.distinct_routers():
            engine, stats = router.engine, router.engine.stats()
            self.metrics.set_engine_state(min(engine.tasks), stats.running, stats.waiting,
                                          kv_usage=stats.kv_cache_usage,
                                          running_adapters=router.running_adapters(), max_lora=engine.num_slots - 1)

    async def stop(self) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
        for router in self.distinct_routers():
            await router.engine.stop()


def build_engines(s: Settings, classifier: Engine | None = None, generator: Engine | None = None) -> list[Engine]:
    """The engines to serve: those given (tests, benchmarks), else those the settings name (worker thread:
    loading a base takes seconds)."""
    from adapters.bases import load_base, local_base
    from adapters.fingerprint import describe_base
    from adapters.pooling import read_pooling
    from service.engine.classifier import ClassifierEngine
    from service.engine.generator import GeneratorEngine

    device = s.resolved_device()

    def load(task: str, base: str):
        precision = s.resolved_precision(task)
        model, tokenizer = load_base(base, task, dtype=precision.dtype, device=device)
        log.info("%s base %s loaded on %s, %s", task, base, device, precision)
        return model, tokenizer, describe_base(model, base, task), precision

    engines = [e for e in (classifier, generator) if e is not None]
    if classifier is None and s.encoder_base:
        model, tokenizer, info, precision = load("classification", s.encoder_base)
        engines.append(ClassifierEngine(model, tokenizer, info, num_slots=s.max_gpu_adapters + 1,
                                        max_rank=s.max_rank, device=device, dtype=precision.dtype,
                                        max_length=s.max_length, quantization=precision.quantization,
                                        pooling=read_pooling(local_base(s.encoder_base))))  # the base's own
    if generator is None and s.decoder_base:
        model, tokenizer, info, precision = load("generation", s.decoder_base)
        engines.append(GeneratorEngine(model, tokenizer, info, num_slots=s.max_gpu_adapters + 1,
                                       max_rank=s.max_rank, max_num_seqs=s.max_num_seqs,
                                       max_model_len=s.max_model_len, device=device, dtype=precision.dtype,
                                       quantization=precision.quantization, cuda_graphs=s.cuda_graphs,
                                       max_tenant_tokens=s.max_tenant_tokens))
    for engine in engines:  # what the precision became per linear (quantize.py: int4 only where lossless)
        if getattr(engine, "linears", None):
            log.info("%s engine: %s", sorted(engine.tasks)[0], engine.linears)
    return engines
