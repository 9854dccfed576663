"""SlotPool and HostCache alone (no asyncio, no HTTP): a fake engine records what happens to its slots."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from service.host_cache import HostCache
from service.slot_pool import SlotPool


class FakeEngine:
    tasks = frozenset({"classification"})
    base_labels = None
    max_rank = 8

    def __init__(self, num_slots: int, device: str = "cpu"):
        self.num_slots, self.device = num_slots, torch.device(device)
        self.cleared: list[int] = []

    def clear_slot(self, slot: int) -> None:
        self.cleared.append(slot)


def weights(name: str):
    return SimpleNamespace(manifest=SimpleNamespace(name=name, labels=None, task="classification"), nbytes=1)


def fill(pool: SlotPool, *keys):
    out = []
    for key in keys:
        slot = pool.claim()
        out.append(pool.add(key, slot, weights(key[0]), 0.0, "registry"))
    return out


def test_claim_evicts_least_recently_used_idle_and_clears_its_slot():
    engine, evicted = FakeEngine(3), []
    pool = SlotPool(engine, on_evict=lambda r: evicted.append(r.key))
    a, b = fill(pool, ("a", 1), ("b", 1))
    assert pool.free_slots == [] and engine.cleared == []
    pool.lease(a)
    pool.release(a)  # a is now more recently used than b
    slot = pool.claim()
    assert slot == b.slot and evicted == [("b", 1)] and engine.cleared == [b.slot] and pool.evictions == 1
    assert pool.get(("b", 1)) is None and pool.get(("a", 1)) is a


def test_leased_or_wanted_residents_are_never_evicted():
    changes = []
    pool = SlotPool(FakeEngine(3), on_change=lambda: changes.append(1))
    a, b = fill(pool, ("a", 1), ("b", 1))
    pool.lease(a)
    pool.want(("b", 1))
    assert pool.claim() is None  # every slot is held: the caller waits
    changes.clear()
    pool.unwant(("b", 1))
    assert changes  # a waiter is woken
    assert pool.claim() == b.slot


def test_retired_resident_is_freed_when_its_last_lease_ends_and_evicted_first():
    engine = FakeEngine(4)
    pool = SlotPool(engine)
    old, new, other = fill(pool, ("x", 1), ("x", 2), ("y", 1))
    pool.lease(old, traffic=False)
    pool.retire(("x", 1))
    assert pool.get(("x", 1)) is old  # still serving its lease
    pool.release(old)
    assert pool.get(("x", 1)) is None and pool.free_slots == [old.slot] and engine.cleared == [old.slot]
    assert (old.requests, new.requests) == (0, 0)  # a management lease is not traffic
    slot = pool.claim()  # the free one
    pool.add(("z", 1), slot, weights("z"), 0.0, "host")
    pool.retire(("y", 1))  # idle: freed at once
    assert pool.get(("y", 1)) is None and other.slot in pool.free_slots


def test_unclaim_zeroes_the_slot_and_frees_it():
    engine = FakeEngine(2)
    pool = SlotPool(engine)
    slot = pool.claim()
    pool.unclaim(slot)
    assert engine.cleared == [slot] and pool.free_slots == [slot]


def test_host_cache_is_lru_bounded_and_pins_only_for_cuda(monkeypatch):
    import service.host_cache as host_cache

    cache = HostCache(2)
    cache.put(("a", 1), weights("a"))
    cache.put(("b", 1), weights("b"))
    assert cache.get(("a", 1)) is not None  # a is now the most recent
    cache.put(("c", 1), weights("c"))
    assert sorted(cache.keys()) == [("a", 1), ("c", 1)] and len(cache) == 2
    cache.put(("a", 2), weights("a"))
    cache.drop_name("a")
    assert cache.keys() == [("c", 1)]
    pinned = []
    monkeypatch.setattr(host_cache, "pin_weights", lambda w: pinned.append(w) or w)
    cpu, cuda = HostCache.for_engine(FakeEngine(2), 4), HostCache.for_engine(FakeEngine(2, "cuda"), 4)
    w = weights("a")
    assert cpu.prepare(w) is w and pinned == []
    assert cuda.prepare(w) is w and pinned == [w]
