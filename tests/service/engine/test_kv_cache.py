"""Tests for service/engine/kv_cache.py: row allocation, usage, and the compaction that keeps rows dense."""

from __future__ import annotations

import pytest
import torch

from service.engine.kv_cache import KVCache
from service.engine.sampling import SamplingParams
from service.engine.sequence import Sequence


def seq() -> Sequence:
    return Sequence([1, 2], SamplingParams())


def test_allocate_until_full() -> None:
    kv = KVCache(2, 1, 4, 2, 8)
    a, b = seq(), seq()
    assert kv.allocate(a) == 0 and kv.allocate(b) == 1
    assert kv.usage == 1.0 and not kv.can_allocate()
    with pytest.raises(RuntimeError):
        kv.allocate(seq())
    assert kv.nbytes == 2 * 2 * 2 * 1 * 8 * 4 * 4


def test_free_moves_last_row_into_the_hole_with_its_cache() -> None:
    kv = KVCache(2, 1, 4, 3, 8)
    seqs = [seq() for _ in range(3)]
    for i, s in enumerate(seqs):
        kv.allocate(s)
        s.num_cached = 5
        kv.k[:, i].fill_(i + 1)
        kv.v[:, i].fill_(-(i + 1))
    kv.free(seqs[0])
    assert seqs[2].row == 0 and seqs[1].row == 1 and seqs[0].row is None
    assert torch.all(kv.k[:, 0, :, :5] == 3) and torch.all(kv.v[:, 0, :, :5] == -3)
    assert kv.usage == pytest.approx(2 / 3)
    kv.free(seqs[1])  # the last row: nothing moves
    assert seqs[2].row == 0 and kv.num_used == 1
    kv.free(seqs[1])  # freeing twice is a no-op
    assert kv.num_used == 1
