"""SlotPool: which adapter version lives in which slot of one engine, and which slots may be reused.

Synchronous bookkeeping, no I/O and no asyncio (the router awaits a free slot and runs the copies in worker
threads). The rules that keep a request's slot from changing under it:

- a slot is written only while it is claimed (taken from the free list, not yet `add`ed);
- a resident with leases (`refs`) or with someone waiting to lease it (`want`) is never evicted;
- a retired resident (no longer what its name serves) is freed when its last lease ends.

Eviction picks retired residents first, then the least recently used, and zeroes the slot through the
engine's `clear_slot`.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters.format import AdapterWeights
from service.engine.protocol import Engine

Key = tuple[str, int]  # (adapter name, version)
_use_clock = itertools.count()  # strictly increasing "last used" ticks: no LRU ties


@dataclass(eq=False)
class Resident:
    name: str
    version: int
    slot: int
    weights: AdapterWeights
    load_seconds: float
    loaded_from: str  # "host" (the host cache) or "registry" (read and validated from files)
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    use_tick: int = field(default_factory=lambda: next(_use_clock))
    refs: int = 0
    requests: int = 0
    retired: bool = False

    @property
    def key(self) -> Key:
        return self.name, self.version


class SlotPool:
    def __init__(self, engine: Engine, *, on_change: Callable[[], None] | None = None,
                 on_evict: Callable[[Resident], None] | None = None) -> None:
        """`on_change`: residency changed or a slot may have become free (the router wakes its waiters);
        `on_evict`: a resident was evicted to make room (metrics)."""
        self.engine = engine
        self._free = list(range(engine.num_slots - 1, 0, -1))  # slot 0 is "no adapter"
        self._residents: dict[Key, Resident] = {}
        self._wanted: Counter[Key] = Counter()
        self._on_change = on_change or (lambda: None)
        self._on_evict = on_evict or (lambda r: None)
        self.evictions = 0

    # ---- reading -------------------------------------------------------------------------------
    def get(self, key: Key) -> Resident | None:
        return self._residents.get(key)

    def residents(self) -> list[Resident]:
        return list(self._residents.values())

    @property
    def free_slots(self) -> list[int]:
        return sorted(self._free)

    # ---- slots ---------------------------------------------------------------------------------
    def claim(self) -> int | None:
        """A slot to load into: a free one, else the victim's (see module doc); None while every slot is
        leased or wanted."""
        if not self._free:
            idle = [r for r in self._residents.values() if r.refs == 0 and not self._wanted[r.key]]
            victim = min(idle, key=lambda r: (not r.retired, r.use_tick), default=None)
            if victim is None:
                return None
            self.evictions += 1
            self._on_evict(victim)
            self._free_slot(victim)
        return self._free.pop()

    def unclaim(self, slot: int) -> None:
        """Give back a claimed slot whose load failed or was abandoned (zeroed: it may be half written)."""
        self.engine.clear_slot(slot)
        self._free.append(slot)
        self._on_change()

    def add(self, key: Key, slot: int, weights: AdapterWeights, load_seconds: float, loaded_from: str) -> Resident:
        """Record a claimed slot as holding `key` (its content was just loaded)."""
        resident = Resident(key[0], key[1], slot, weights, load_seconds, loaded_from)
        self._residents[key] = resident
        self._on_change()
        return resident

    # ---- leases --------------------------------------------------------------------------------
    def want(self, key: Key) -> None:
        """Someone waits to lease `key` (e.g. its load is running): not evictable until `unwant`."""
        self._wanted[key] += 1

    def unwant(self, key: Key) -> None:
        self._wanted[key] -= 1
        if self._wanted[key] <= 0:
            del self._wanted[key]
            self._on_change()

    def lease(self, resident: Resident, *, traffic: bool = True) -> None:
        resident.refs += 1
        resident.use_tick = next(_use_clock)
        resident.last_used = time.time()
        if traffic:
            resident.requests += 1

    def release(self, resident: Resident) -> None:
        resident.refs -= 1
        if resident.refs == 0:
            if resident.retired and self._residents.get(resident.key) is resident:
                self._free_slot(resident)  # a retired version: its last request finished
            self._on_change()  # evictable now

    def retire(self, key: Key) -> None:
        """`key` no longer serves its name: free its slot now, or when its last lease ends."""
        resident = self._residents.get(key)
        if resident is None:
            return
        if resident.refs == 0:
            self._free_slot(resident)
        else:
            resident.retired = True

    def unretire(self, key: Key) -> None:
        resident = self._residents.get(key)
        if resident is not None:
            resident.retired = False

    def _free_slot(self, resident: Resident) -> None:
        del self._residents[resident.key]
        self.engine.clear_slot(resident.slot)
        self._free.append(resident.slot)
        self._on_change()
