"""Adapter residency for one engine: which adapter version lives in which slot, and for how long.

Tiers: engine slots (fixed count) ↔ host memory (validated `AdapterWeights`, LRU; pinned when the engine
is on CUDA) ↔ registry. Requests take a refcounted `Lease`; a leased slot is never evicted or overwritten,
so an update serves new requests on the new version while old ones finish on the old.

Concurrency model: all bookkeeping is mutated on the event loop, file I/O and tensor copies run in worker
threads. Every `await` is a point where another coroutine may have changed the state, so the rules are:

- A slot's content and the `Resident` that names it change together: a slot is only written while it is
  owned by exactly one `_load` (popped from `_free`, not yet in `_residents`), and only a `Resident` with
  no lease and no coroutine waiting for it (`_waiting`) may be evicted.
- `acquire` never trusts a `Resident` it got across an `await`: after waiting for a load it looks the key
  up again and takes the lease synchronously (no await between the look-up and `refs += 1`).
- Switching what a plain name serves is "newest operation wins": load/unload/update each take a ticket
  (`_seq[name]`) before their first await and only act if no newer operation on that name started since.
- An unloaded name is refused at once; a load that finishes after the unload frees its slot again.
- Releasing a lease is synchronous (no tasks are scheduled); load coroutines waiting for a slot are woken
  by resolving their futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.errors import (
    AdapterConflictError,
    AdapterNotFoundError,
    AdapterValidationError,
    LoraswapError,
    RegistryError,
)
from adapters.format import AdapterWeights, read_adapter
from adapters.peft import BASE_TASKS
from adapters.ref import AdapterRef

log = logging.getLogger("loraswap.adapters")
Key = tuple[str, int]
_use_clock = itertools.count()  # strictly increasing "last used" ticks: no LRU ties


@dataclass(eq=False)
class Resident:
    name: str
    version: int
    slot: int
    weights: AdapterWeights
    load_seconds: float
    tier: str = "registry"  # where it was loaded from: "registry" (disk/remote) or "cpu" (host cache)
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    use_tick: int = field(default_factory=lambda: next(_use_clock))
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
    task: str | None = None  # the adapter's manifest task (None: the base model, which serves every task)

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()


def pin_weights(weights: AdapterWeights) -> AdapterWeights:
    """Page-lock the host copy so slot loads to the GPU are plain DMA copies (CUDA engines only)."""
    weights.lora = {k: m.map(lambda t: t.pin_memory()) for k, m in weights.lora.items()}
    weights.head = {k: t.pin_memory() for k, t in weights.head.items()}
    return weights


def _engine_on_cuda(engine) -> bool:
    device = getattr(engine, "device", None)
    return getattr(device, "type", str(device or "")).startswith("cuda")


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
        self.pin_memory = _engine_on_cuda(engine)
        self._on_residency_change = on_residency_change
        self._free = list(range(engine.num_slots - 1, 0, -1))  # slot 0 is "no adapter"
        self._residents: dict[Key, Resident] = {}
        self._current: dict[str, Key] = {}  # what a plain `name` serves
        self._follow: dict[str, AdapterRef] = {}  # what the watch re-resolves a name to (absent: plain name)
        self._retired: set[Key] = set()  # superseded/unloaded versions: freed when their last lease ends
        self._paths: dict[Key, Path] = {}  # adapters loaded from a path rather than the registry
        self._host: OrderedDict[Key, AdapterWeights] = OrderedDict()
        self._disabled: set[str] = set()  # unloaded names: not loaded on demand until loaded again
        self._loading: dict[Key, asyncio.Task] = {}
        self._waiting: Counter[Key] = Counter()  # coroutines waiting for a key's load: not evictable yet
        self._seq: Counter[str] = Counter()  # per-name ticket of the newest load/unload/update
        self._failed: dict[Key, str] = {}  # versions the watch could not load (not retried every poll)
        self._requests: Counter[str] = Counter()  # cumulative per name, across versions and reloads
        self._slot_waiters: list[asyncio.Future] = []
        self._load_sem = asyncio.Semaphore(max_concurrent_loads)
        self.stats = Counter()  # hits / misses / evictions / loads, for benchmarks and tests

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
        missed = False
        while True:
            key, plain = await self._resolve(ref)
            resident = self._residents.get(key)
            if resident is None:
                missed = True
                await self._ensure_resident(key)
                continue  # look it up again: it may have been switched, unloaded or evicted meanwhile
            if key[0] in self._disabled:
                raise AdapterNotFoundError(f"adapter {key[0]!r} is unloaded (load it again with POST /v1/adapters)")
            if plain and key[0] not in self._current:
                self._current[key[0]] = key  # first on-demand use of a plain name: the watch follows it now
                self._retired.discard(key)
            self.stats["misses" if missed else "hits"] += 1
            return self._take_lease(resident)

    def _take_lease(self, resident: Resident) -> Lease:
        resident.refs += 1
        resident.requests += 1
        resident.last_used = time.time()
        resident.use_tick = next(_use_clock)
        self._requests[resident.name] += 1
        return Lease(resident.slot, resident.name, resident.version, resident.weights.manifest.labels,
                     _release=lambda: self._release(resident), task=resident.weights.manifest.task)

    def _release(self, resident: Resident) -> None:
        resident.refs -= 1
        if resident.refs == 0:
            key = (resident.name, resident.version)
            if key in self._retired and self._residents.get(key) is resident:
                self._free_slot(key)  # a retired version: its last request finished
            self._wake_slot_waiters()  # it is evictable now

    def _wake_slot_waiters(self) -> None:
        waiters, self._slot_waiters = self._slot_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _resolve(self, ref: str) -> tuple[Key, bool]:
        """(key, whether `ref` was a plain name)."""
        try:
            parsed = AdapterRef.parse(ref)
        except AdapterValidationError as exc:
            raise AdapterNotFoundError(f"adapter {ref!r} not found ({exc})") from exc
        name = parsed.name
        plain = parsed.version is None and parsed.alias is None
        if name in self._disabled:
            raise AdapterNotFoundError(f"adapter {name!r} is unloaded (load it again with POST /v1/adapters)")
        if parsed.version is not None and (name, parsed.version) in self._residents:
            return (name, parsed.version), False
        if plain and name in self._current:
            return self._current[name], True
        if not self.load_on_demand:
            raise AdapterNotFoundError(f"adapter {ref!r} is not loaded (on-demand loading is off)")
        return await asyncio.to_thread(self.registry.resolve, parsed), plain

    # ---- loading ------------------------------------------------------------------------

    async def _ensure_resident(self, key: Key) -> None:
        """Load `key` into a slot once, however many requests ask for it at the same time. Returns when it
        is resident (or failed); the caller looks it up again. While we wait it cannot be evicted."""
        if key in self._residents:
            return
        pending = self._loading.get(key)
        if pending is None or pending.done():
            pending = asyncio.get_running_loop().create_task(self._load(key))
            self._loading[key] = pending
        self._waiting[key] += 1
        try:
            await asyncio.shield(pending)
        finally:
            self._waiting[key] -= 1
            if self._waiting[key] <= 0:
                del self._waiting[key]
            if self._loading.get(key) is pending and pending.done():
                del self._loading[key]

    async def _load(self, key: Key) -> Resident:
        name, version = key
        started = time.perf_counter()
        tier = "cpu" if key in self._host else "registry"
        try:
            async with self._load_sem:
                if key in self._residents:  # loaded by someone else while we queued
                    return self._residents[key]
                weights = self._host.get(key)
                if weights is None:
                    weights = await asyncio.to_thread(self._read, key)
                self._check_task(weights)
                if name in self._disabled:
                    raise AdapterNotFoundError(f"adapter {name!r} was unloaded while it was loading")
                self._remember_host(key, weights)
                slot = await self._take_slot()
                try:
                    await asyncio.to_thread(self.engine.load_slot, slot, weights)
                except BaseException as exc:
                    self._free.append(slot)
                    self._wake_slot_waiters()
                    if isinstance(exc, ValueError):  # valid adapter this engine cannot serve (e.g. LoRA on a
                        raise AdapterValidationError(f"{name}@{version}: {exc}") from None  # pooler): 422
                    raise
                if name in self._disabled:  # unloaded while we were loading: give the slot back
                    self._free.append(slot)
                    self._wake_slot_waiters()
                    raise AdapterNotFoundError(f"adapter {name!r} was unloaded while it was loading")
        except LoraswapError:
            self._observe_load(name, tier, started, "refused")
            raise
        except Exception:
            self._observe_load(name, tier, started, "error")
            raise
        resident = Resident(name, version, slot, weights, load_seconds=time.perf_counter() - started, tier=tier)
        self._residents[key] = resident
        self.stats["loads"] += 1
        self._set_resident_gauges()
        self._observe_load(name, tier, started, "ok")
        log.info("loaded %s@%d into slot %d from %s in %.1f ms", name, version, slot, tier,
                 resident.load_seconds * 1e3)
        return resident

    def _read(self, key: Key) -> AdapterWeights:
        path = self._paths.get(key) or self.registry.fetch(*key)
        return self._read_path(path)

    def _read_path(self, path: Path) -> AdapterWeights:
        """Validate and read (worker thread); pinned for CUDA engines."""
        try:
            weights = read_adapter(path, self.engine.base_info, max_rank=self.engine.max_rank)
        except OSError as exc:  # a file vanished or failed mid-read (version deleted meanwhile, flaky disk)
            raise RegistryError(f"cannot read adapter files in {path}: {exc.strerror or exc}") from exc
        return pin_weights(weights) if self.pin_memory else weights

    def _check_task(self, weights: AdapterWeights) -> None:
        m = weights.manifest
        if BASE_TASKS.get(m.task, m.task) != self.task:  # embedding adapters share the encoder's slots
            raise AdapterConflictError(f"adapter {m.name}@{m.version} is a {m.task} adapter; this endpoint serves {self.task}")

    def _remember_host(self, key: Key, weights: AdapterWeights) -> None:
        self._host[key] = weights
        self._host.move_to_end(key)
        while len(self._host) > self.max_cpu_adapters:
            self._host.popitem(last=False)
        self._set_resident_gauges()

    def _victim(self) -> Resident | None:
        """The least recently used resident with no lease and nobody waiting to take one."""
        idle = [r for k, r in self._residents.items() if r.refs == 0 and not self._waiting.get(k)]
        # Retired versions (no longer served by their name) go first, then the least recently used.
        return min(idle, key=lambda r: ((r.name, r.version) not in self._retired, r.use_tick), default=None)

    async def _take_slot(self) -> int:
        """A free slot, evicting the least recently used idle adapter; waits while all are leased."""
        while True:
            if self._free:
                return self._free.pop()
            victim = self._victim()
            if victim is not None:
                self._free_slot((victim.name, victim.version))
                self.stats["evictions"] += 1
                if self.metrics:
                    self.metrics.count_eviction(victim.name)
                continue
            waiter = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._slot_waiters:
                    self._slot_waiters.remove(waiter)

    def _free_slot(self, key: Key) -> None:
        resident = self._residents.pop(key, None)
        self._retired.discard(key)
        if resident is not None:
            self._free.append(resident.slot)
            self._set_resident_gauges()
            self._wake_slot_waiters()

    def _retire(self, key: Key) -> None:
        """`key` no longer serves its plain name: free its slot now, or when its last lease ends."""
        resident = self._residents.get(key)
        if resident is None:
            return
        if resident.refs == 0:
            self._free_slot(key)
        else:
            self._retired.add(key)

    async def _pinned(self, key: Key) -> Lease:
        """A lease on `key` for management operations (loads it if needed), so it cannot be evicted
        between the load and the switch."""
        while True:
            resident = self._residents.get(key)
            if resident is not None:
                lease = self._take_lease(resident)
                resident.requests -= 1  # management, not traffic
                self._requests[key[0]] -= 1
                return lease
            await self._ensure_resident(key)

    def _switch(self, key: Key) -> None:
        old = self._current.get(key[0])
        self._current[key[0]] = key
        self._retired.discard(key)
        if old and old != key:
            self._retire(old)

    # ---- management API -----------------------------------------------------------------

    async def load(self, ref: str | None = None, path: str | Path | None = None) -> Resident:
        """Load (or update to) a version and make the plain name serve it. A refused adapter raises and
        changes nothing that is serving."""
        if (ref is None) == (path is None):
            raise LoraswapError("give exactly one of `adapter` (registry ref) or `path`")
        if path is not None:
            weights = await asyncio.to_thread(self._read_path, Path(path))
            self._check_task(weights)
            key = (weights.manifest.name, weights.manifest.version)
            if key in self._residents and self._paths.get(key) != Path(path):
                raise AdapterConflictError(f"{key[0]}@{key[1]} is already loaded from elsewhere; publish a new version")
            follow = None
        else:
            try:
                parsed = AdapterRef.parse(ref)
            except AdapterValidationError as exc:
                raise AdapterNotFoundError(f"adapter {ref!r} not found ({exc})") from exc
            key = await asyncio.to_thread(self.registry.resolve, parsed)
            follow = parsed if parsed.version is None else None
        name = key[0]
        self._seq[name] += 1
        ticket = self._seq[name]
        was_disabled = name in self._disabled
        self._disabled.discard(name)
        added_path = path is not None and key not in self._paths
        if path is not None:
            self._paths[key] = Path(path)
            self._remember_host(key, weights)
        try:
            lease = await self._pinned(key)
        except BaseException:
            if added_path and key not in self._residents:
                self._paths.pop(key, None)
                self._host.pop(key, None)
            if was_disabled and self._seq[name] == ticket:
                self._disabled.add(name)  # a refused load leaves an unloaded name unloaded
            raise
        try:
            resident = self._residents[key]
            if self._seq[name] == ticket:  # no newer load/unload/update of this name started meanwhile
                self._switch(key)
                self._failed.pop(key, None)
                if path is not None:
                    self._follow.pop(name, None)  # path-loaded: the watch leaves it (see refresh)
                elif follow is None:
                    self._follow[name] = AdapterRef(name, key[1], None)  # pinned version: the watch leaves it
                else:
                    self._follow[name] = follow
            return resident
        finally:
            lease.release()

    async def unload(self, name: str) -> None:
        keys = [k for k in self._residents if k[0] == name]
        if name not in self._current and not keys and not any(k[0] == name for k in self._loading):
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        self._seq[name] += 1
        self._current.pop(name, None)
        self._follow.pop(name, None)
        self._disabled.add(name)
        for key in keys:
            self._retire(key)
        for key in [k for k in self._host if k[0] == name]:
            del self._host[key]
        for key in [k for k in self._paths if k[0] == name]:
            del self._paths[key]
        for key in [k for k in self._failed if k[0] == name]:
            del self._failed[key]
        self._set_resident_gauges()

    def _targets(self, names: dict[str, AdapterRef]) -> dict[str, Key | None]:
        """Where each followed name points in the registry now (worker thread). One listing of the whole
        registry (`snapshot`) instead of one `resolve` per name; same rule as `Registry.resolve`."""
        snapshot = self.registry.snapshot()
        out: dict[str, Key | None] = {}
        for name, ref in names.items():
            entry = snapshot.get(name)
            if not entry or not entry["versions"]:
                out[name] = None  # deleted from the registry: keep serving what we have
            elif ref.alias is not None:
                v = entry["aliases"].get(ref.alias)
                out[name] = (name, v) if v is not None else None
            else:
                out[name] = (name, entry["aliases"].get("stable", entry["versions"][-1]))
        return out

    async def refresh(self) -> list[Key]:
        """Point every registry-followed name at what the registry now resolves it to (watch step)."""
        follow = {name: self._follow.get(name, AdapterRef(name, None, None))
                  for name, key in self._current.items() if key not in self._paths}
        follow = {name: ref for name, ref in follow.items() if ref.version is None}
        if not follow:
            return []
        targets = await asyncio.to_thread(self._targets, follow)
        updates = [new for name, new in targets.items()
                   if new is not None and self._current.get(name) not in (None, new) and new not in self._failed]
        done = await asyncio.gather(*(self._update(new) for new in updates))
        return [key for key in done if key is not None]

    async def _update(self, new: Key) -> Key | None:
        name = new[0]
        self._seq[name] += 1
        ticket = self._seq[name]
        try:
            lease = await self._pinned(new)
        except LoraswapError as exc:
            if self._seq[name] == ticket and exc.status < 500:  # refused: do not retry it every poll
                self._failed[new] = str(exc)
            log.warning("not switching %s to version %d: %s", name, new[1], exc)
            return None
        try:
            old = self._current.get(name)
            if self._seq[name] != ticket or old is None:  # superseded, or unloaded meanwhile
                return None
            self._switch(new)
            log.info("%s now serves version %d (was %d)", name, new[1], old[1])
            return new
        finally:
            lease.release()

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
                "task": weights.manifest.task if weights else self.task,
                "tier": "gpu" if r else ("cpu" if weights else "registry"),
                "slot": r.slot if r else None,
                "size_bytes": weights.nbytes if weights else None,
                "load_ms": round(r.load_seconds * 1e3, 3) if r else None,
                "loaded_from": r.tier if r else None,
                "loaded_at": r.loaded_at if r else None,
                "last_used": r.last_used if r else None,
                "requests": self._requests[name],
                "version_requests": r.requests if r else 0,
                "in_flight": sum(x.refs for k, x in self._residents.items() if k[0] == name),
                "resident_versions": sorted(k[1] for k in self._residents if k[0] == name),
                "follows": str(self._follow[name]) if name in self._follow else name,
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
