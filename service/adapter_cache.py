"""Adapter residency for one engine: which adapter version lives in which slot, and for how long.

Tiers: engine slots (fixed count) ↔ host memory (validated `AdapterWeights`, LRU) ↔ registry.
Requests take a refcounted `Lease`; a leased slot is never evicted or overwritten, so an update
serves new requests on the new version while old ones finish on the old. All state is mutated on
the event loop; file I/O and tensor copies run in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.errors import AdapterConflictError, AdapterNotFoundError, AdapterValidationError, LoraswapError
from adapters.format import AdapterWeights, read_adapter
from adapters.ref import AdapterRef

log = logging.getLogger("loraswap.adapters")
Key = tuple[str, int]


@dataclass
class Resident:
    name: str
    version: int
    slot: int
    weights: AdapterWeights
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    refs: int = 0
    requests: int = 0


@dataclass
class Lease:
    """What a request holds while it runs: the slot and the identity that served it."""

    slot: int
    name: str | None
    version: int | None
    labels: list[str] | None
    _release: Any = None

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()


class AdapterManager:
    def __init__(self, engine, registry, *, base_ids: set[str], base_labels: list[str] | None = None,
                 max_cpu_adapters: int = 128, max_concurrent_loads: int = 2, load_on_demand: bool = True,
                 metrics=None, on_residency_change=None):
        self.engine = engine
        self.task: str = engine.task
        self.registry = registry
        self.base_ids = base_ids
        self.base_labels = base_labels
        self.max_cpu_adapters = max_cpu_adapters
        self.load_on_demand = load_on_demand
        self.metrics = metrics
        self._on_residency_change = on_residency_change
        self._free = list(range(engine.num_slots - 1, 0, -1))  # slot 0 is "no adapter"
        self._residents: dict[Key, Resident] = {}
        self._current: dict[str, Key] = {}  # what a plain `name` serves
        self._paths: dict[Key, Path] = {}  # adapters loaded from a path rather than the registry
        self._host: OrderedDict[Key, AdapterWeights] = OrderedDict()
        self._disabled: set[str] = set()  # unloaded names: not loaded on demand until loaded again
        self._loading: dict[Key, asyncio.Future] = {}
        self._load_sem = asyncio.Semaphore(max_concurrent_loads)
        self._slot_freed = asyncio.Condition()

    # ---- requests -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, ref: str):
        lease = await self.acquire(ref)
        try:
            yield lease
        finally:
            lease.release()

    async def acquire(self, ref: str) -> Lease:
        if ref in self.base_ids:
            return Lease(slot=0, name=None, version=None, labels=self.base_labels)
        key = await self._resolve(ref)
        resident = self._residents.get(key) or await self._ensure_resident(key)
        resident.refs += 1
        resident.requests += 1
        resident.last_used = time.time()
        return Lease(resident.slot, resident.name, resident.version, resident.weights.manifest.labels,
                     _release=lambda: self._release(resident))

    def _release(self, resident: Resident) -> None:
        resident.refs -= 1
        key = (resident.name, resident.version)
        if resident.refs == 0 and not self._wanted(key):
            self._free_slot(key)  # a retired version: its last request finished
        asyncio.get_running_loop().create_task(self._notify_slot_freed())

    async def _notify_slot_freed(self) -> None:
        async with self._slot_freed:
            self._slot_freed.notify_all()

    async def _resolve(self, ref: str) -> Key:
        try:
            parsed = AdapterRef.parse(ref)
        except AdapterValidationError as exc:
            raise AdapterNotFoundError(f"adapter {ref!r} not found ({exc})") from exc
        name = parsed.name
        if name in self._disabled:
            raise AdapterNotFoundError(f"adapter {name!r} is unloaded (load it again with POST /v1/adapters)")
        if parsed.version is not None and (name, parsed.version) in self._residents:
            return (name, parsed.version)
        if parsed.version is None and parsed.alias is None and name in self._current:
            return self._current[name]
        if not self.load_on_demand:
            raise AdapterNotFoundError(f"adapter {ref!r} is not loaded (on-demand loading is off)")
        name, version = await asyncio.to_thread(self.registry.resolve, ref)
        if parsed.version is None and parsed.alias is None:
            self._current.setdefault(name, (name, version))
        return (name, version)

    # ---- loading ------------------------------------------------------------------------

    async def _ensure_resident(self, key: Key) -> Resident:
        """Load `key` into a slot once, however many requests ask for it at the same time."""
        if key in self._residents:
            return self._residents[key]
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_task(self._load(key))
            self._loading[key] = pending
            pending.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(pending)

    async def _load(self, key: Key) -> Resident:
        name, version = key
        started = time.perf_counter()
        tier = "cpu" if key in self._host else "registry"
        try:
            async with self._load_sem:
                weights = self._host.get(key) or await asyncio.to_thread(self._read, key)
                self._check_task(weights)
                self._remember_host(key, weights)
                slot = await self._take_slot()
                try:
                    await asyncio.to_thread(self.engine.load_slot, slot, weights)
                except BaseException:
                    self._free.append(slot)
                    raise
        except LoraswapError:
            self._observe_load(name, tier, started, "refused")
            raise
        except Exception:
            self._observe_load(name, tier, started, "error")
            raise
        resident = Resident(name, version, slot, weights, load_seconds=time.perf_counter() - started)
        self._residents[key] = resident
        self._observe_load(name, tier, started, "ok")
        log.info("loaded %s@%d into slot %d in %.1f ms", name, version, slot, resident.load_seconds * 1e3)
        return resident

    def _read(self, key: Key) -> AdapterWeights:
        path = self._paths.get(key) or self.registry.fetch(*key)
        return read_adapter(path, self.engine.base_info, max_rank=self.engine.max_rank)

    def _check_task(self, weights: AdapterWeights) -> None:
        m = weights.manifest
        if m.task != self.task:
            raise AdapterConflictError(f"adapter {m.name}@{m.version} is a {m.task} adapter; this endpoint serves {self.task}")

    def _remember_host(self, key: Key, weights: AdapterWeights) -> None:
        self._host[key] = weights
        self._host.move_to_end(key)
        while len(self._host) > self.max_cpu_adapters:
            self._host.popitem(last=False)
        self._set_resident_gauges()

    async def _take_slot(self) -> int:
        """A free slot, evicting the least recently used idle adapter; waits while all are leased."""
        async with self._slot_freed:
            while True:
                if self._free:
                    return self._free.pop()
                idle = [r for r in self._residents.values() if r.refs == 0]
                if idle:
                    victim = min(idle, key=lambda r: r.last_used)
                    self._free_slot((victim.name, victim.version))
                    if self.metrics:
                        self.metrics.count_eviction(victim.name)
                    continue
                await self._slot_freed.wait()

    def _free_slot(self, key: Key) -> None:
        resident = self._residents.pop(key, None)
        if resident is not None:
            self._free.append(resident.slot)
            self._set_resident_gauges()

    def _wanted(self, key: Key) -> bool:
        """A version stays resident while a plain name points at it (it may still be evicted by LRU)."""
        return self._current.get(key[0]) == key

    # ---- management API -----------------------------------------------------------------

    async def load(self, ref: str | None = None, path: str | Path | None = None) -> Resident:
        """Load (or update to) a version and make the plain name serve it."""
        if (ref is None) == (path is None):
            raise LoraswapError("give exactly one of `adapter` (registry ref) or `path`")
        if path is not None:
            weights = await asyncio.to_thread(read_adapter, Path(path), self.engine.base_info,
                                              max_rank=self.engine.max_rank)
            self._check_task(weights)
            key = (weights.manifest.name, weights.manifest.version)
            if key in self._residents and self._paths.get(key) != Path(path):
                raise AdapterConflictError(f"{key[0]}@{key[1]} is already loaded from elsewhere; publish a new version")
            self._paths[key] = Path(path)
            self._remember_host(key, weights)
        else:
            key = await asyncio.to_thread(self.registry.resolve, ref)
        self._disabled.discard(key[0])
        resident = await self._ensure_resident(key)
        self._switch(key)
        return resident

    def _switch(self, key: Key) -> None:
        old = self._current.get(key[0])
        self._current[key[0]] = key
        if old and old != key and old in self._residents and self._residents[old].refs == 0:
            self._free_slot(old)

    async def unload(self, name: str) -> None:
        keys = [k for k in self._residents if k[0] == name]
        if name not in self._current and not keys:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        self._current.pop(name, None)
        self._disabled.add(name)
        for key in keys:
            if self._residents[key].refs == 0:
                self._free_slot(key)
        for key in [k for k in self._host if k[0] == name]:
            del self._host[key]
        self._set_resident_gauges()

    async def refresh(self) -> list[Key]:
        """Point every registry-backed name at what the registry now resolves it to (watch step)."""
        updated = []
        for name, key in list(self._current.items()):
            if key in self._paths:
                continue
            try:
                new = await asyncio.to_thread(self.registry.resolve, name)
            except AdapterNotFoundError:
                continue  # deleted from the registry: keep serving what we have
            if new != key and name in self._current:
                try:
                    await self._ensure_resident(new)
                except LoraswapError as exc:
                    log.warning("not switching %s to version %d: %s", name, new[1], exc)
                    continue
                self._switch(new)
                updated.append(new)
                log.info("%s now serves version %d (was %d)", name, new[1], key[1])
        return updated

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:  # a flaky registry must not kill the watch
                log.exception("registry watch step failed")

    def describe(self) -> list[dict[str, Any]]:
        rows = []
        for name in sorted(set(self._current) | {k[0] for k in self._residents}):
            key = self._current.get(name)
            r = self._residents.get(key) if key else None
            weights = r.weights if r else self._host.get(key) if key else None
            rows.append({
                "name": name,
                "version": key[1] if key else None,
                "task": self.task,
                "tier": "gpu" if r else ("cpu" if weights else "registry"),
                "slot": r.slot if r else None,
                "size_bytes": weights.nbytes if weights else None,
                "load_ms": round(r.load_seconds * 1e3, 3) if r else None,
                "loaded_at": r.loaded_at if r else None,
                "last_used": r.last_used if r else None,
                "requests": r.requests if r else 0,
                "in_flight": sum(x.refs for k, x in self._residents.items() if k[0] == name),
                "resident_versions": sorted(k[1] for k in self._residents if k[0] == name),
                "source": str(self._paths[key]) if key in self._paths else "registry",
            })
        return rows

    def resident_names(self) -> list[str]:
        return sorted(self._current)

    # ---- metrics ------------------------------------------------------------------------

    def _observe_load(self, name: str, tier: str, started: float, result: str) -> None:
        if self.metrics:
            self.metrics.observe_adapter_load(name, tier, time.perf_counter() - started, result)

    def residency(self) -> dict[str, int]:
        return {"gpu": len(self._residents), "cpu": len(self._host)}

    def running_adapters(self) -> list[str]:
        """Names with requests in flight (for the vLLM lora_requests_info gauge)."""
        return sorted({r.name for r in self._residents.values() if r.refs > 0})

    def _set_resident_gauges(self) -> None:
        if self._on_residency_change:
            self._on_residency_change()
