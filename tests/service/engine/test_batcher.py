"""Tests for service/engine/batcher.py with a fake engine (batching, splitting, limits, failures, the
event loop never blocked) and once with the tiny ClassifierEngine (answers equal direct classify()).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import torch

from service.engine.batcher import ClassifyBatcher, QueueFullError


class FakeEngine:
    """tokenize: one id per word; run: logits row = [slot, length, first id] (identifies the row)."""

    def __init__(self, delay: float = 0.0, fail_slot: int | None = None) -> None:
        self.delay, self.fail_slot = delay, fail_slot
        self.max_length = 512  # token-id rows are cut here, as texts are by the tokenizer
        self.batches: list[tuple[list[list[int]], list[int]]] = []
        self.threads: set[str] = set()

    def tokenize(self, texts):
        return [[int(w) for w in t.split()] for t in texts]

    def run(self, rows, slots):
        self.threads.add(threading.current_thread().name)
        self.batches.append((rows, slots))
        time.sleep(self.delay)
        if self.fail_slot in slots:
            raise RuntimeError(f"boom in slot {self.fail_slot}")
        return [
            torch.tensor([float(s), float(len(r)), float(r[0])]) for r, s in zip(rows, slots, strict=True)
        ]


def _text(first: int, length: int) -> str:
    return " ".join([str(first)] + ["7"] * (length - 1))


async def test_concurrent_requests_share_batches_and_get_their_rows() -> None:
    engine, stats = FakeEngine(), []
    batcher = ClassifyBatcher(engine, max_batch_size=64, max_wait_ms=20, on_batch=lambda *a: stats.append(a))
    await batcher.start()
    jobs = [batcher.submit([_text(i, 1 + i % 5), _text(100 + i, 3)], slot=i % 4) for i in range(20)]
    results = await asyncio.gather(*jobs)
    await batcher.stop()
    for i, out in enumerate(results):
        assert [t.tolist() for t in out] == [[i % 4, 1 + i % 5, i], [i % 4, 3, 100 + i]]
    assert len(engine.batches) < 20  # batched, not one forward per request
    assert sum(size for size, _, _ in stats) == 40
    assert max(distinct for _, distinct, _ in stats) > 1  # different adapters in one batch
    assert all(w >= 0 for _, _, waits in stats for w in waits)
    assert engine.threads == {"compute_0"}  # off the event loop, on the one compute thread (compute.py)


async def test_oversized_request_split_and_reassembled_within_limits() -> None:
    engine = FakeEngine()
    batcher = ClassifyBatcher(engine, max_batch_size=8, max_batch_tokens=40, max_wait_ms=1)
    await batcher.start()
    texts = [_text(i, 1 + (i * 7) % 9) for i in range(50)]
    out = await batcher.submit(texts, slot=2)
    await batcher.stop()
    assert [t[2].item() for t in out] == list(range(50))  # the caller's order, whatever the batches
    assert [t[1].item() for t in out] == [1 + (i * 7) % 9 for i in range(50)]
    for rows, _ in engine.batches:
        assert len(rows) <= 8 and max(map(len, rows)) * len(rows) <= 40
    # bucketing: within a batch rows come sorted by length
    assert all([len(r) for r in rows] == sorted(len(r) for r in rows) for rows, _ in engine.batches)


async def test_queue_full_raises() -> None:
    engine = FakeEngine(delay=0.2)
    batcher = ClassifyBatcher(engine, max_batch_size=1, max_wait_ms=0, max_queue=2)
    await batcher.start()
    first = asyncio.create_task(batcher.submit("1", 1))
    await asyncio.sleep(0.05)  # the first one is running
    waiting = [asyncio.create_task(batcher.submit(str(i), 1)) for i in (2, 3)]
    await asyncio.sleep(0.05)
    assert batcher.queue_depth == 2 and batcher.running == 1
    with pytest.raises(QueueFullError) as info:
        await batcher.submit("4", 1)
    assert info.value.status == 429
    await asyncio.gather(first, *waiting)
    assert batcher.queue_depth == 0 and batcher.running == 0
    await batcher.stop()


async def test_requests_waiting_for_the_tokenizer_count_towards_the_queue() -> None:
    """A burst queues in front of the tokenizer thread before it reaches the batch queue: those requests
    are waiting too, so the burst beyond max_queue is refused at once instead of queueing without bound."""

    class SlowTokenizer(FakeEngine):
        def tokenize(self, texts):
            time.sleep(0.05)
            return super().tokenize(texts)

    batcher = ClassifyBatcher(SlowTokenizer(), max_batch_size=64, max_wait_ms=0, max_queue=3)
    await batcher.start()
    burst = [asyncio.create_task(batcher.submit(str(i), 1)) for i in range(1, 9)]
    await asyncio.sleep(0)  # all eight have entered submit; three are admitted, in or waiting for the tokenizer
    assert batcher.queue_depth == 3
    results = await asyncio.gather(*burst, return_exceptions=True)
    refused = [r for r in results if isinstance(r, QueueFullError)]
    assert len(refused) == 5 and all(not isinstance(r, BaseException) for r in results[:3]), results
    assert batcher.queue_depth == 0 and (await batcher.submit("9", 1))[0].tolist() == [1.0, 1.0, 9.0]
    await batcher.stop()


async def test_failing_batch_fails_only_its_requests() -> None:
    engine = FakeEngine(fail_slot=3)
    batcher = ClassifyBatcher(engine, max_batch_size=4, max_wait_ms=1)
    await batcher.start()
    with pytest.raises(RuntimeError, match="boom"):
        await batcher.submit(["1 2", "3"], slot=3)
    assert (await batcher.submit("5", slot=1))[0].tolist() == [1.0, 1.0, 5.0]
    assert batcher.running == 0
    await batcher.stop()


async def test_event_loop_not_blocked_by_the_model() -> None:
    engine = FakeEngine(delay=0.3)
    batcher = ClassifyBatcher(engine, max_wait_ms=1)
    await batcher.start()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    await batcher.submit("1 2 3", slot=0)
    task.cancel()
    await batcher.stop()
    assert ticks >= 15  # the loop kept ticking through a 0.3 s forward pass


async def test_cancelled_request_is_dropped() -> None:
    engine = FakeEngine(delay=0.1)
    batcher = ClassifyBatcher(engine, max_batch_size=1, max_wait_ms=0)
    await batcher.start()
    first = asyncio.create_task(batcher.submit("1", 1))
    await asyncio.sleep(0.02)
    second = asyncio.create_task(batcher.submit("2", 1))
    await asyncio.sleep(0.02)
    second.cancel()
    await first
    await asyncio.sleep(0.15)
    assert batcher.queue_depth == 0 and batcher.running == 0
    assert [rows for rows, _ in engine.batches] == [[[1]]]
    await batcher.stop()


async def test_with_classifier_engine_matches_direct_classify(tiny_base_dir, peft_adapters, kit) -> None:
    from transformers import AutoTokenizer

    from service.engine.classifier import ClassifierEngine

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    engine = ClassifierEngine(
        kit.load_base(tiny_base_dir), tok, object(), num_slots=4, max_rank=16, max_length=16
    )
    for slot in (1, 2, 3):
        engine.load_slot(slot, peft_adapters[slot][1])
    rng = random.Random(3)
    requests = [
        ([kit.random_text(rng, 30) for _ in range(rng.randint(1, 6))], rng.randint(0, 3)) for _ in range(12)
    ]
    batcher = ClassifyBatcher(engine, max_batch_size=8, max_batch_tokens=64, max_wait_ms=5)
    await batcher.start()
    got = await asyncio.gather(*(batcher.submit(texts, slot) for texts, slot in requests))
    await batcher.stop()
    for (texts, slot), out in zip(requests, got, strict=True):
        want = engine.classify(texts, [slot] * len(texts))
        assert len(out) == len(want)
        for a, b in zip(out, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


async def test_sparse_request_does_not_wait_but_bursts_still_batch() -> None:
    """A request after a quiet spell runs at once (no max_wait added to its latency); requests arriving
    together still share batches."""
    engine = FakeEngine()
    batcher = ClassifyBatcher(engine, max_batch_size=64, max_wait_ms=1000)
    await batcher.start()
    started = time.perf_counter()
    assert [t.tolist() for t in await batcher.submit("5 7", slot=1)] == [[1.0, 2.0, 5.0]]
    assert time.perf_counter() - started < 0.5  # would be >= 1 s if it waited for company
    results = await asyncio.gather(*(batcher.submit(_text(i, 2), slot=i % 3) for i in range(12)))
    await batcher.stop()
    assert [out[0].tolist()[2] for out in results] == list(range(12))
    assert len(engine.batches) <= 3  # the lone request, then the burst in one or two batches


async def test_tenants_share_by_tokens_not_by_arrival() -> None:
    """One tenant's three big requests (120 rows each) are queued first; another tenant's one-row request
    arriving after them runs within the next two batches, not after 360 rows (FIFO would take 45 batches)."""
    engine = FakeEngine(delay=0.01)
    batcher = ClassifyBatcher(engine, max_batch_size=8, max_batch_tokens=80, max_wait_ms=1)
    await batcher.start()
    big = [asyncio.create_task(batcher.submit([_text(1000 + i, 9)] * 120, slot=1, tenant="a")) for i in range(3)]
    await asyncio.sleep(0.03)  # the big ones are running
    seen = len(engine.batches)
    small = await batcher.submit([_text(5, 1)], slot=2, tenant="b")
    ran = next(i for i, (rows, _) in enumerate(engine.batches) if [5] in rows)
    assert small[0].tolist() == [2.0, 1.0, 5.0] and ran - seen <= 2, (seen, ran)
    out = await asyncio.gather(*big)
    await batcher.stop()
    assert all(len(rows) == 120 and all(r[2] == 1000 + i for r in rows) for i, rows in enumerate(out))
    for rows, _ in engine.batches:  # every batch stays within the limits, also when tenants mix
        assert len(rows) <= 8 and max(map(len, rows)) * len(rows) <= 80


async def test_a_tenant_s_outstanding_tokens_are_bounded() -> None:
    engine = FakeEngine(delay=0.2)
    batcher = ClassifyBatcher(engine, max_batch_size=4, max_wait_ms=0, max_tenant_tokens=100)
    await batcher.start()
    first = asyncio.create_task(batcher.submit([_text(1, 10)] * 8, slot=1, tenant="a"))  # 80 tokens
    await asyncio.sleep(0.05)  # 4 of its rows run, 4 wait: all 80 tokens are still outstanding
    with pytest.raises(QueueFullError, match="tokens queued"):
        await batcher.submit([_text(2, 10)] * 3, slot=1, tenant="a")  # 110 > 100
    other = await batcher.submit([_text(3, 10)] * 3, slot=1, tenant="b")  # another key is not affected
    assert len(other) == 3 and len(await first) == 8
    assert len(await batcher.submit([_text(2, 10)] * 3, slot=1, tenant="a")) == 3  # room again
    await batcher.stop()


async def test_failed_and_cancelled_requests_give_their_tokens_back() -> None:
    """The per-key count is kept as requests come and go: a failing batch and a caller that goes away
    mid-request (some rows run, some queued) must both return what they held, or the key stays refused."""
    engine = FakeEngine(delay=0.1, fail_slot=9)
    batcher = ClassifyBatcher(engine, max_batch_size=4, max_wait_ms=0, max_tenant_tokens=100)
    await batcher.start()
    with pytest.raises(RuntimeError, match="boom"):
        await batcher.submit([_text(1, 10)] * 9, slot=9, tenant="a")  # 90 tokens, its first batch fails
    cancelled = asyncio.create_task(batcher.submit([_text(2, 10)] * 9, slot=1, tenant="a"))
    await asyncio.sleep(0.05)  # 4 rows in the running batch, 5 queued
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await asyncio.sleep(0.1)  # the batch it was in finishes; its rows are dropped
    assert len(await batcher.submit([_text(3, 10)] * 10, slot=1, tenant="a")) == 10  # all 100 tokens free
    await batcher.stop()


async def test_a_row_with_non_finite_scores_fails_its_own_request_only() -> None:
    class NanSlot(FakeEngine):
        def run(self, rows, slots):
            return [row * float("nan") if s == 3 else row for row, s in zip(super().run(rows, slots), slots, strict=True)]

    from service.engine.sampling import RowFailedError

    batcher = ClassifyBatcher(NanSlot(), max_batch_size=8, max_wait_ms=20)
    await batcher.start()
    got = await asyncio.gather(batcher.submit(["1 7", "2"], 1), batcher.submit(["3"], 3), batcher.submit(["4"], 2),
                               return_exceptions=True)  # fmt: skip
    await batcher.stop()
    assert isinstance(got[1], RowFailedError) and "non-finite" in str(got[1])
    assert [t.tolist() for t in got[0]] == [[1, 2, 1], [1, 1, 2]] and got[2][0].tolist() == [2, 1, 4]


async def test_background_rows_wait_for_an_idle_model_and_never_join_a_foreground_batch() -> None:
    """Shadow copies run as background work: queued behind foreground rows that arrive later, in batches of
    their own, and refused past the queue bound without touching the foreground queue. Rows go in as token
    ids (no tokenizer thread), so they are queued at once, while the first batch runs."""
    engine = FakeEngine(delay=0.2)
    batcher = ClassifyBatcher(engine, max_batch_size=8, max_wait_ms=1, max_queue=3)
    await batcher.start()
    blocker = asyncio.create_task(batcher.submit([[1, 7]], slot=1, tenant="a"))
    await asyncio.sleep(0.05)  # the blocker's batch is running
    shadow = [asyncio.create_task(batcher.submit([[500 + i, 7]], slot=3, tenant="s", background=True))
              for i in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFullError, match="background"):
        await batcher.submit([[600, 7]], slot=3, tenant="s", background=True)
    front = [asyncio.create_task(batcher.submit([[100 + i, 7]], slot=2, tenant="a")) for i in range(3)]
    out = await asyncio.gather(blocker, *front, *shadow)
    await batcher.stop()
    assert [o[0][2] for o in out] == [1, 100, 101, 102, 500, 501, 502]
    kinds = [{"bg" if s == 3 else "fg" for s in slots} for _, slots in engine.batches]
    assert kinds == [{"fg"}, {"fg"}, {"bg"}], kinds  # the waiting foreground first, never mixed
