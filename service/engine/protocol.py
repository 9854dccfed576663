"""The one interface the service drives every engine through: slots in, start, stop, stats.

The router and slot pool know engines only by this protocol; the context maps each adapter task to the
engine that serves it (several tasks may share one engine, e.g. an encoder's classification and embedding
adapters, and with it one slot pool).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from adapters.fingerprint import BaseModelInfo
from adapters.format import AdapterWeights

if TYPE_CHECKING:
    from service.config import Settings


StepObserver = Callable[[int, int], None]  # (rows or sequences in a step, distinct slots among them)


@dataclass(frozen=True)
class EngineStats:
    """What an engine is doing now (read at scrape time)."""

    running: int  # requests with work in the running batch
    waiting: int  # requests queued for the engine
    kv_cache_usage: float | None = None  # 0..1, engines with a KV cache only


class Engine(Protocol):
    tasks: frozenset[str]  # the adapter tasks it serves ("classification", "generation", ...)
    base_info: BaseModelInfo  # from adapters.fingerprint.describe_base
    num_slots: int  # slot 0 = no adapter; adapters use 1..num_slots-1
    max_rank: int
    device: torch.device
    base_labels: list[str] | None  # the label names the base itself answers with (slot 0), if any

    def load_slot(self, slot: int, weights: AdapterWeights) -> None:
        """Copy a validated adapter into `slot` (no module replaced); raises AdapterValidationError for an
        adapter this engine cannot serve, leaving the slot as it was. No running request uses `slot`."""

    def clear_slot(self, slot: int) -> None:
        """Zero `slot`: it serves the base model again."""

    async def start(self, settings: Settings, on_step: StepObserver | None = None) -> None:
        """Start serving (worker threads, batching loops); `settings` gives the serving limits; `on_step` is
        told the size of every engine step (any thread)."""

    async def stop(self) -> None:
        """Stop serving; requests not finished fail."""

    def stats(self) -> EngineStats: ...
