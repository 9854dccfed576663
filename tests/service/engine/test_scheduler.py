"""Tests for service/engine/scheduler.py with plain Sequences and a tiny KV cache (no model):
admission by free rows and token budget, prefill/decode alternation, finishing and freeing.
"""

from __future__ import annotations

import pytest

from service.engine.kv_cache import KVCache
from service.engine.sampling import SamplingParams
from service.engine.scheduler import Scheduler
from service.engine.sequence import Sequence, SequenceStatus


def make(rows: int = 2, budget: int = 64, max_len: int = 32) -> Scheduler:
    return Scheduler(KVCache(1, 1, 2, rows, max_len), budget, eos_token_ids=[0])


def seq(n: int, max_tokens: int = 4, **kw) -> Sequence:
    return Sequence(list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens, **kw))


def test_prefill_first_then_decode_sorted_by_row() -> None:
    s = make(rows=3)
    a, b = seq(3), seq(5)
    s.add(a)
    s.add(b)
    batch, prefill = s.schedule()
    assert prefill and batch == [a, b] and (a.row, b.row) == (0, 1)
    s.postprocess(batch, [7, 7])
    assert a.num_cached == 3 and b.num_cached == 5 and len(a) == 4
    batch, prefill = s.schedule()
    assert not prefill and batch == [a, b]
    c = seq(2)
    s.add(c)  # joins between steps: the next step is its prefill
    batch, prefill = s.schedule()
    assert prefill and batch == [c] and c.row == 2


def test_admission_waits_for_a_free_row() -> None:
    s = make(rows=1)
    a, b = seq(2, max_tokens=1), seq(2)
    s.add(a)
    s.add(b)
    assert s.schedule() == ([a], True)
    assert b.status is SequenceStatus.WAITING and not s.kv_cache.can_allocate()
    assert s.postprocess([a], [9]) == [a] and a.finish_reason == "length"
    assert s.schedule() == ([b], True)


def test_token_budget_counts_padding_but_admits_a_long_prompt_alone() -> None:
    s = make(rows=4, budget=10)
    a, b, c = seq(4), seq(6), seq(3)
    for x in (a, b, c):
        s.add(x)
    assert s.schedule() == ([a], True)  # a + b would pad to 2 x 6 = 12 > 10
    assert s.schedule() == ([b], True)
    long = seq(20)
    s2 = make(rows=2, budget=10)
    s2.add(long)
    assert s2.schedule() == ([long], True)


def test_eos_max_tokens_and_context_end() -> None:
    s = make(rows=3, max_len=8)
    eos, short, ctx = seq(2, max_tokens=5), seq(2, max_tokens=2), seq(6, max_tokens=10)
    ignore = seq(2, max_tokens=5, ignore_eos=True)
    for x in (eos, short, ctx):
        s.add(x)
    batch, _ = s.schedule()
    assert s.postprocess(batch, [0, 5, 5]) == [eos]
    assert eos.finish_reason == "stop" and eos.row is None
    s.add(ignore)
    s.schedule()
    batch, _ = s.schedule()
    done = s.postprocess(batch, [5, 5, 0])
    assert set(done) == {short, ctx}
    assert short.finish_reason == "length" and ctx.finish_reason == "length" and len(ctx) == 8
    assert not ignore.is_finished and s.kv_cache.num_used == 1


def test_finish_frees_rows_and_keeps_them_dense() -> None:
    s = make(rows=3)
    seqs = [seq(2), seq(3), seq(4)]
    for x in seqs:
        s.add(x)
    s.schedule()
    s.finish(seqs[0], "abort")
    assert seqs[2].row == 0 and seqs[1].row == 1 and s.kv_cache.num_used == 2
    batch, _ = s.schedule()
    assert [x.row for x in batch] == [0, 1]
    waiting = seq(2)
    s.add(waiting)
    s.finish(waiting, "abort")  # cancelled before it ever ran
    assert not s.waiting and waiting.finish_reason == "abort"


def test_aborted_mid_step_is_skipped_by_postprocess() -> None:
    s = make()
    a = seq(2)
    s.add(a)
    batch, _ = s.schedule()
    s.finish(a, "abort")
    assert s.postprocess(batch, [5]) == [] and len(a) == 2


def test_prompt_that_fills_the_context_is_refused() -> None:
    with pytest.raises(ValueError, match="context"):
        make(max_len=8).add(seq(8))


def test_tenants_are_admitted_in_turn() -> None:
    """Key a queues four prompts, then key b one: b's prompt takes the second free row, not the fifth."""
    s = make(rows=2)
    mk = [Sequence([1, 2, 3], SamplingParams(max_tokens=1), tenant=t) for t in ("a", "a", "a", "a", "b")]
    for q in mk:
        s.add(q)
    batch, prefill = s.schedule()
    assert prefill and batch == [mk[0], mk[4]]
    s.postprocess(batch, [7, 7])  # both finish (max_tokens 1): rows free again
    batch, _ = s.schedule()
    assert batch == [mk[1], mk[2]]  # only a waits now: its own order
