"""AdapterRouter: what each adapter ref is served by on one engine, and getting it there.

Resolves `name`, `name@version` and `name@alias` once (through `Registry.resolve`, or the same rule over a
registry snapshot in the watch), loads on demand from the host cache or the registry into a slot of the
engine's `SlotPool`, hands out leases, and moves names between versions: load/follow, alias moves, updates
found by the watch, unload. One router per engine; the engine may serve several tasks.

Concurrency: all bookkeeping changes on the event loop, file reads and slot copies run in worker threads.
Every `await` may see the state changed, so:
- `acquire` never trusts a resident it saw before an `await`: it looks the key up again and leases it with
  no await in between; while it waits for a load the key is `want`ed, so it cannot be evicted meanwhile;
- what a plain name serves is "newest operation wins": load/unload/update take a ticket (`_seq[name]`)
  before their first await and act only if no newer operation on that name started since;
- an unloaded name is refused at once; a load that finishes after the unload frees its slot again;
- releasing a lease is synchronous; loads waiting for a slot are woken by resolving their futures.

Rollout: requests for a plain `name` are shared between what it resolves to and its weighted aliases
(canaries, `Traffic`): by a hash of the caller's route key when there is one (one caller sees one version,
and raising a weight only moves callers onto the canary), else at random. A `shadow` alias marks the lease;
the endpoint then sends the same rows to the shadow version (service/shadow.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from adapters.errors import (
    AdapterConflictError,
    AdapterNotFoundError,
    AdapterValidationError,
    LoraswapError,
    RegistryError,
)
from adapters.format import AdapterWeights, read_adapter
from adapters.manifest import Manifest
from adapters.ref import AdapterRef
from adapters.registry import Registry, Traffic, resolve_in, traffic_in
from service.engine.protocol import Engine
from service.host_cache import HostCache
from service.metrics import Metrics
from service.slot_pool import Key, Resident, SlotPool

log = logging.getLogger("loraswap.adapters")


@dataclass
class Lease:
    """What a request holds while it runs: the slot and the identity that served it."""

    slot: int
    name: str | None  # None: the base model
    version: int | None
    labels: list[str] | None
    _release: Callable[[], None] | None = None
    temperature: float = 1.0  # the manifest's calibration (classification); 1.0 / 0.0 when it has none
    min_score: float = 0.0
    shadow: Key | None = None  # a version that gets a copy of this request (the name's shadow alias)

    def scores(self, logits: Tensor) -> tuple[Tensor, list[str]]:
        """A classification row's calibrated scores (softmax of logits / temperature) and its label names."""
        labels = self.labels or [f"LABEL_{i}" for i in range(logits.shape[-1])]
        return torch.softmax(logits.float() / self.temperature, dim=-1), labels

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()


@dataclass(frozen=True)
class Residency:
    """One adapter name as the router serves it (the HTTP view is built from this in api/adapters.py)."""

    name: str
    version: int | None  # what the plain name serves now
    task: str | None
    tier: str  # where that version lives: "device" (an engine slot), "host" or "registry"
    device: str | None  # the device type of the engine's slots ("cpu", "cuda") when tier is "device"
    slot: int | None
    size_bytes: int | None
    load_ms: float | None
    loaded_from: str | None  # "host" or "registry"
    loaded_at: float | None
    last_used: float | None
    requests: int  # all versions, since start
    version_requests: int  # the version in its slot now
    in_flight: int
    resident_versions: list[int]
    follows: str  # the ref the registry watch re-resolves (a pinned `name@v` is not moved)
    source: str  # "registry" or the local folder it was loaded from


def _parse(ref: str) -> AdapterRef:
    try:
        return AdapterRef.parse(ref)
    except AdapterValidationError as exc:
        raise AdapterNotFoundError(f"adapter {ref!r} not found ({exc})") from exc


def route_position(name: str, route_key: str | None) -> float:
    """Where a request falls in [0, 1) for the canary split: fixed per (name, route key), else random."""
    if route_key is None:
        return random.random()
    digest = hashlib.blake2b(f"{name}\0{route_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _other_task(key: Key, found: str, task: str) -> AdapterConflictError:
    return AdapterConflictError(f"adapter {key[0]}@{key[1]} is a {found} adapter; this endpoint serves {task} adapters")


class AdapterRouter:
    def __init__(self, engine: Engine, registry: Registry, host: HostCache, *, base_ids: set[str],
                 base_labels: list[str] | None = None, max_concurrent_loads: int = 2, load_on_demand: bool = True,
                 metrics: Metrics | None = None, on_residency_change: Callable[[], None] | None = None) -> None:
        self.engine, self.registry, self.host = engine, registry, host
        self.base_ids, self.base_labels = base_ids, base_labels
        self.load_on_demand = load_on_demand
        self.metrics = metrics
        self._on_residency_change = on_residency_change or (lambda: None)
        self.pool = SlotPool(engine, on_change=self._pool_changed, on_evict=self._evicted)
        self._current: dict[str, Key] = {}  # what a plain `name` serves
        self._follow: dict[str, AdapterRef] = {}  # what the watch re-resolves a name to (absent: plain name)
        self._paths: dict[Key, Path] = {}  # adapters loaded from a folder rather than the registry
        self._disabled: set[str] = set()  # unloaded names: not loaded on demand until loaded again
        self._loading: dict[Key, asyncio.Task] = {}
        self._seq: Counter[str] = Counter()  # per-name ticket of the newest load/unload/update
        self._failed: set[Key] = set()  # versions the watch could not load (not retried every poll)
        self._traffic: dict[str, Traffic] = {}  # canaries and shadow of followed plain names
        self._requests: Counter[str] = Counter()  # per name, across versions and reloads
        self._slot_waiters: list[asyncio.Future] = []
        self._load_sem = asyncio.Semaphore(max_concurrent_loads)
        self.stats: Counter[str] = Counter()  # hits / misses / loads, for benchmarks and tests

    # ---- requests -------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lease(self, ref: str, task: str | None = None, route_key: str | None = None, *,
                    traffic: bool = True) -> AsyncIterator[Lease]:
        lease = await self.acquire(ref, task, route_key, traffic=traffic)
        try:
            yield lease
        finally:
            lease.release()

    async def acquire(self, ref: str, task: str | None = None, route_key: str | None = None, *,
                      traffic: bool = True) -> Lease:
        """A lease on what `ref` serves now, loading it on demand; `task` given, an adapter of another
        task (the engine may serve several) is refused with 409. A plain name is split between its version
        and its canaries by `route_key` (see route_position). `traffic=False`: not counted as a request of
        the name (shadow copies)."""
        if ref in self.base_ids:
            return Lease(slot=0, name=None, version=None, labels=self.base_labels)
        parsed = _parse(ref)
        primary = await self._key(parsed)
        plain = parsed.version is None and parsed.alias is None
        rollout = self._traffic.get(parsed.name) if plain else None
        key = self._route(primary, rollout, route_key) if rollout else primary
        if task is not None and self.pool.get(key) is None:
            await self._refuse_other_task(key, task)
        missed = False
        while (resident := self.pool.get(key)) is None:
            missed = True
            await self._ensure_resident(key)  # then look it up again: it may be gone already
        if key[0] in self._disabled:
            raise AdapterNotFoundError(f"adapter {key[0]!r} is unloaded (load it again with POST /v1/adapters)")
        if plain and key[0] not in self._current:
            self._current[key[0]] = primary  # first on-demand use of a plain name: the watch follows it now
            self.pool.unretire(primary)
        adapter_task = resident.weights.manifest.task
        if task is not None and adapter_task != task:
            raise _other_task(key, adapter_task, task)
        self.stats["misses" if missed else "hits"] += 1
        lease = self._lease(resident, traffic=traffic)
        if rollout and rollout.shadow and rollout.shadow[0] != key[1] and random.random() < rollout.shadow[1]:
            lease.shadow = (key[0], rollout.shadow[0])
        return lease

    @staticmethod
    def _route(primary: Key, rollout: Traffic, route_key: str | None) -> Key:
        """The canary a request falls on (each takes its weight of [0, 1), in order), else `primary`."""
        at = route_position(primary[0], route_key) if rollout.canaries else 1.0
        for version, weight in rollout.canaries:
            if at < weight:
                return primary[0], version
            at -= weight
        return primary

    def _lease(self, resident: Resident, *, traffic: bool = True) -> Lease:
        self.pool.lease(resident, traffic=traffic)
        if traffic:
            self._requests[resident.name] += 1
        manifest = resident.weights.manifest
        return Lease(resident.slot, resident.name, resident.version, manifest.labels,
                     _release=lambda: self.pool.release(resident),
                     temperature=manifest.calibration.temperature if manifest.calibration else 1.0,
                     min_score=manifest.min_score or 0.0)

    async def _refuse_other_task(self, key: Key, task: str) -> None:
        """409 before a load: another task's adapter (the engine may serve several) must not take a slot,
        and evict an idle adapter, only to be refused. Reads the manifest alone (host cache, folder or registry)."""
        weights = self.host.get(key)
        if weights is not None:
            found = weights.manifest.task
        elif key in self._paths:
            found = (await asyncio.to_thread(Manifest.load, self._paths[key])).task
        else:
            found = (await asyncio.to_thread(self.registry.manifest, *key)).task
        if found != task:
            raise _other_task(key, found, task)

    async def _key(self, ref: AdapterRef) -> Key:
        """The one resolution of a request's ref: what is served already, else the registry's answer."""
        if ref.name in self._disabled:
            raise AdapterNotFoundError(f"adapter {ref.name!r} is unloaded (load it again with POST /v1/adapters)")
        if ref.version is not None and self.pool.get((ref.name, ref.version)) is not None:
            return ref.name, ref.version
        plain = ref.version is None and ref.alias is None
        if plain and ref.name in self._current:
            return self._current[ref.name]
        if not self.load_on_demand:
            raise AdapterNotFoundError(f"adapter {ref} is not loaded (on-demand loading is off)")
        if not plain:
            return await asyncio.to_thread(self.registry.resolve, ref)
        entry = await asyncio.to_thread(self.registry.listing, ref.name)  # first use: its rollout too
        key = resolve_in(ref, entry["versions"], entry["aliases"])
        if ref.name not in self._current:  # else a load (maybe pinned) decided meanwhile
            self._traffic[ref.name] = traffic_in(entry["aliases"], entry["weights"])
        return key

    # ---- loading -------------------------------------------------------------------------------
    async def _ensure_resident(self, key: Key) -> None:
        """Load `key` into a slot once, however many requests ask for it at the same time. Returns when it
        is resident (or raises); the caller looks it up again. While we wait it cannot be evicted."""
        pending = self._loading.get(key)
        if pending is None or pending.done():
            pending = self._loading[key] = asyncio.get_running_loop().create_task(self._load(key))
        self.pool.want(key)
        try:
            await asyncio.shield(pending)
        finally:
            self.pool.unwant(key)
            if self._loading.get(key) is pending and pending.done():
                del self._loading[key]

    async def _load(self, key: Key) -> None:
        name, version = key
        started = time.perf_counter()
        tier = "host" if key in self.host else "registry"
        try:
            async with self._load_sem:
                if self.pool.get(key) is not None:  # loaded by someone else while we queued
                    return
                weights = self.host.get(key)
                if weights is None:
                    weights = await asyncio.to_thread(self._read, self._paths.get(key) or key)
                self._check_task(weights)
                self._refuse_unloaded(name)
                self.host.put(key, weights)
                slot = await self._claim_slot()
                try:
                    await asyncio.to_thread(self.engine.load_slot, slot, weights)
                    self._refuse_unloaded(name)  # unloaded while we were loading: give the slot back
                except BaseException:
                    self.pool.unclaim(slot)
                    raise
        except LoraswapError:
            self._observe_load(name, tier, started, "refused")
            raise
        except Exception:
            self._observe_load(name, tier, started, "error")
            raise
        resident = self.pool.add(key, slot, weights, time.perf_counter() - started, tier)
        self.stats["loads"] += 1
        self._observe_load(name, tier, started, "ok")
        log.info("loaded %s@%d into slot %d from %s in %.1f ms", name, version, slot, tier,
                 resident.load_seconds * 1e3)

    def _refuse_unloaded(self, name: str) -> None:
        if name in self._disabled:
            raise AdapterNotFoundError(f"adapter {name!r} was unloaded while it was loading")

    def _read(self, source: Key | Path) -> AdapterWeights:
        """Fetch, validate and read (worker thread); page-locked for CUDA engines."""
        path = source if isinstance(source, Path) else self.registry.fetch(*source)
        try:
            weights = read_adapter(path, self.engine.base_info, max_rank=self.engine.max_rank)
        except OSError as exc:  # a file vanished or failed mid-read (version deleted meanwhile, flaky disk)
            raise RegistryError(f"cannot read adapter files in {path}: {exc.strerror or exc}") from exc
        return self.host.prepare(weights)

    def _check_task(self, weights: AdapterWeights) -> None:
        m = weights.manifest
        if m.task not in self.engine.tasks:
            served = ", ".join(sorted(self.engine.tasks))
            raise AdapterConflictError(f"adapter {m.name}@{m.version} is a {m.task} adapter; this engine serves {served}")

    async def _claim_slot(self) -> int:
        """A slot to load into (SlotPool.claim); waits while every slot is leased."""
        while (slot := self.pool.claim()) is None:
            waiter = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._slot_waiters:
                    self._slot_waiters.remove(waiter)
        return slot

    def _pool_changed(self) -> None:
        waiters, self._slot_waiters = self._slot_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._on_residency_change()

    def _evicted(self, resident: Resident) -> None:
        if self.metrics is not None:
            self.metrics.count_eviction(resident.name)

    async def _held(self, key: Key) -> Lease:
        """A management lease on `key` (loaded if needed), so it cannot be evicted before the switch."""
        while (resident := self.pool.get(key)) is None:
            await self._ensure_resident(key)
        return self._lease(resident, traffic=False)

    def _switch(self, key: Key) -> None:
        old = self._current.get(key[0])
        self._current[key[0]] = key
        self.pool.unretire(key)
        if old and old != key:
            self.pool.retire(old)

    # ---- management -----------------------------------------------------------------------------
    async def read_path(self, path: Path) -> AdapterWeights:
        """Validate and read an adapter folder for `load(path=...)` (checks the task too)."""
        weights = await asyncio.to_thread(self._read, path)
        self._check_task(weights)
        return weights

    async def load(self, key: Key, follow: AdapterRef | None = None, *, path: Path | None = None,
                   weights: AdapterWeights | None = None) -> Resident:
        """Make the plain name serve `key` (already resolved by the caller), loading it if needed. `follow`:
        the ref the watch re-resolves (None: pinned); `path` + `weights`: loaded from a folder
        (`read_path`), which the watch leaves alone. A refused adapter raises and changes nothing."""
        name = key[0]
        if path is not None:
            if self.pool.get(key) is not None and self._paths.get(key) != path:
                raise AdapterConflictError(f"{name}@{key[1]} is already loaded from elsewhere; publish a new version")
        self._seq[name] += 1
        ticket = self._seq[name]
        was_disabled = name in self._disabled
        self._disabled.discard(name)
        added_path = path is not None and key not in self._paths
        if path is not None:
            self._paths[key] = path
            self.host.put(key, weights)
        try:
            lease = await self._held(key)
        except BaseException:
            if added_path and self.pool.get(key) is None:
                self._paths.pop(key, None)
                self.host.discard(key)
            if was_disabled and self._seq[name] == ticket:
                self._disabled.add(name)  # a refused load leaves an unloaded name unloaded
            raise
        try:
            resident = self.pool.get(key)
            if self._seq[name] == ticket:  # no newer load/unload/update of this name started meanwhile
                self._switch(key)
                self._failed.discard(key)
                if path is not None:
                    self._follow.pop(name, None)  # folder-loaded: the watch leaves it (see refresh)
                elif follow is None:
                    self._follow[name] = AdapterRef(name, key[1], None)  # pinned: the watch leaves it
                else:
                    self._follow[name] = follow
                if path is not None or follow is None:
                    self._traffic.pop(name, None)  # a pinned or folder-loaded name is not split
            return resident
        finally:
            lease.release()

    def serves(self, name: str) -> bool:
        """Whether `name` is loaded here (serving, resident or loading)."""
        return (name in self._current or any(r.name == name for r in self.pool.residents())
                or any(k[0] == name for k in self._loading))

    async def unload(self, name: str) -> None:
        if not self.serves(name):
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        self._seq[name] += 1
        self._current.pop(name, None)
        self._follow.pop(name, None)
        self._traffic.pop(name, None)
        self._disabled.add(name)
        for resident in [r for r in self.pool.residents() if r.name == name]:
            self.pool.retire(resident.key)
        self.host.drop_name(name)
        for key in [k for k in self._paths if k[0] == name]:
            del self._paths[key]
        self._failed = {k for k in self._failed if k[0] != name}
        self._on_residency_change()

    # ---- the registry watch ----------------------------------------------------------------------
    def _targets(self, follow: dict[str, AdapterRef]) -> dict[str, tuple[Key | None, Traffic]]:
        """Where each followed name points in the registry now, and its rollout (worker thread): one
        `snapshot` of the whole registry instead of one `resolve` per name. A name deleted from the registry,
        or an alias removed, keeps serving what it has (None)."""
        snapshot = self.registry.snapshot()
        out = {}
        for name, ref in follow.items():
            entry = snapshot.get(name, {"versions": [], "aliases": {}, "weights": {}})
            key = None
            with contextlib.suppress(AdapterNotFoundError):
                key = resolve_in(ref, entry["versions"], entry["aliases"])
            out[name] = key, traffic_in(entry["aliases"], entry["weights"])
        return out

    async def refresh(self) -> list[Key]:
        """Point every registry-followed name at what the registry now resolves it to (watch step)."""
        follow = {name: self._follow.get(name, AdapterRef(name, None, None))
                  for name, key in self._current.items() if key not in self._paths}
        follow = {name: ref for name, ref in follow.items() if ref.version is None}
        if not follow:
            return []
        targets = await asyncio.to_thread(self._targets, follow)
        for name, (_, rollout) in targets.items():
            if name in self._current:  # not unloaded meanwhile
                self._traffic[name] = rollout
        updates = [new for name, (new, _) in targets.items()
                   if new is not None and self._current.get(name) not in (None, new) and new not in self._failed]
        done = await asyncio.gather(*(self._update(new) for new in updates))
        return [key for key in done if key is not None]

    async def _update(self, new: Key) -> Key | None:
        name = new[0]
        self._seq[name] += 1
        ticket = self._seq[name]
        try:
            lease = await self._held(new)
        except LoraswapError as exc:
            if self._seq[name] == ticket and exc.status < 500:  # refused: do not retry it every poll
                self._failed.add(new)
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

    # ---- views ----------------------------------------------------------------------------------
    def residency(self) -> list[Residency]:
        rows = []
        residents = self.pool.residents()
        for name in sorted(set(self._current) | {r.name for r in residents}):
            key = self._current.get(name)
            r = self.pool.get(key) if key else None
            weights = r.weights if r else self.host.get(key) if key else None
            mine = [x for x in residents if x.name == name]
            rows.append(Residency(
                name=name, version=key[1] if key else None,
                task=weights.manifest.task if weights else None,
                tier="device" if r else ("host" if weights else "registry"),
                device=self.engine.device.type if r else None,
                slot=r.slot if r else None, size_bytes=weights.nbytes if weights else None,
                load_ms=round(r.load_seconds * 1e3, 3) if r else None, loaded_from=r.loaded_from if r else None,
                loaded_at=r.loaded_at if r else None, last_used=r.last_used if r else None,
                requests=self._requests[name], version_requests=r.requests if r else 0,
                in_flight=sum(x.refs for x in mine), resident_versions=sorted(x.version for x in mine),
                follows=str(self._follow[name]) if name in self._follow else name,
                source=str(self._paths[key]) if key in self._paths else "registry",
            ))
        return rows

    def running_adapters(self) -> list[str]:
        """Names with requests in flight (for the vLLM lora_requests_info gauge)."""
        return sorted({r.name for r in self.pool.residents() if r.refs > 0})

    def loaded(self) -> dict[str, list[str]]:
        """Adapter names by tier, for the vLLM loaded-adapter gauges: "gpu" = in an engine slot (on any
        device), "cpu" = in the host cache."""
        return {"gpu": sorted({r.name for r in self.pool.residents()}),
                "cpu": sorted({k[0] for k in self.host.keys()})}

    def _observe_load(self, name: str, tier: str, started: float, result: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_adapter_load(name, tier, time.perf_counter() - started, result)
