"""HostCache: validated adapter weights kept in host memory, least recently used out first.

The tier between the registry (files, maybe remote) and an engine's slots: a slot load from here is a
tensor copy, no read or validation. For a CUDA engine the copies are page-locked, so that copy is a DMA.
"""

from __future__ import annotations

from collections import OrderedDict

from adapters.format import AdapterWeights
from service.engine.protocol import Engine

Key = tuple[str, int]  # (adapter name, version)


def pin_weights(weights: AdapterWeights) -> AdapterWeights:
    """Page-lock every tensor of an adapter (CUDA engines only)."""
    weights.lora = {k: m.map(lambda t: t.pin_memory()) for k, m in weights.lora.items()}
    weights.head = {k: t.pin_memory() for k, t in weights.head.items()}
    return weights


class HostCache:
    def __init__(self, capacity: int, *, page_locked: bool = False) -> None:
        self.capacity = capacity
        self.page_locked = page_locked  # the engine is on CUDA
        self._items: OrderedDict[Key, AdapterWeights] = OrderedDict()

    @classmethod
    def for_engine(cls, engine: Engine, capacity: int) -> HostCache:
        """A cache for `engine`'s adapters: page-locked when its slots are on CUDA."""
        return cls(capacity, page_locked=engine.device.type == "cuda")

    def prepare(self, weights: AdapterWeights) -> AdapterWeights:
        """What to keep for freshly read weights (a worker thread calls this: pinning copies)."""
        return pin_weights(weights) if self.page_locked else weights

    def get(self, key: Key) -> AdapterWeights | None:
        weights = self._items.get(key)
        if weights is not None:
            self._items.move_to_end(key)
        return weights

    def put(self, key: Key, weights: AdapterWeights) -> None:
        self._items[key] = weights
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def discard(self, key: Key) -> None:
        self._items.pop(key, None)

    def drop_name(self, name: str) -> None:
        for key in [k for k in self._items if k[0] == name]:
            del self._items[key]

    def keys(self) -> list[Key]:
        return list(self._items)

    def __contains__(self, key: Key) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
