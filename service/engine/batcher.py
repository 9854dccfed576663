"""ClassifyBatcher: asyncio dynamic batching of classify requests into ClassifierEngine batches.
Rows of many requests (any adapters) are bucketed by length; the model runs in one worker thread.
Tenants (API keys) share the model by deficit round robin over tokens, so one key's huge requests
cannot hold another key's small ones behind them. Background requests (shadow copies) run only when no
other row waits, in batches of their own: they never join, reorder or change an answer's batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from adapters.errors import OverloadedError, RowFailedError
from service.engine import compute

BatchCallback = Callable[[int, int, list[float]], None]


class QueueFullError(OverloadedError):
    """Too many requests waiting: the service answers 429 with Retry-After."""


@dataclass(eq=False)
class _Request:
    rows: list[list[int]]  # token ids per text
    slot: int
    future: asyncio.Future
    tenant: str | None = None  # the API key's id: the unit of fair sharing (None: auth off)
    submitted: float = field(default_factory=time.perf_counter)  # queued (tokenized)
    arrived: float = 0.0  # submit called (before tokenizing)
    results: list[Tensor | None] = field(default_factory=list)
    next_row: int = 0  # rows before this one are already in a batch
    done_rows: int = 0
    sparse: bool = False  # nothing else arrived within max_wait before it: do not wait for company
    on_start: Callable[[float], None] | None = None  # told the queue wait when its first row runs
    embed: bool = False  # its rows want pooled embeddings, not logits (same batches, same slots)
    tokens_left: int = 0  # tokens of rows whose results are not back yet (counted in the tenant's total)

    @property
    def started(self) -> bool:
        return self.next_row > 0


class ClassifyBatcher:
    """Collects rows for up to `max_wait_ms` (or until a full batch is waiting; a lone request after a quiet
    spell does not wait), sorts a window of them
    by length, cuts it into batches of <= max_batch_size rows and <= max_batch_tokens padded tokens,
    and runs each batch in the single model thread. Callers get their own rows back, in order.
    """

    def __init__(
        self,
        engine,
        max_batch_size: int = 64,
        max_batch_tokens: int = 8192,
        max_wait_ms: float = 2,
        max_queue: int = 1024,
        on_batch: BatchCallback | None = None,
        max_tenant_tokens: int = 1 << 18,
        shared_batch_tokens: int = 512,
    ) -> None:
        self.engine = engine
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.max_tenant_tokens = max_tenant_tokens  # queued tokens per tenant before 429
        # Padded tokens of a batch while several tenants wait: a batch cannot be interrupted, so its length
        # is what a newcomer may wait (benchmarks/fairness.py measures it).
        self.shared_batch_tokens = min(shared_batch_tokens, max_batch_tokens)
        # Tokens each tenant has queued or running, kept as requests come and go: summing them per submit was
        # quadratic in the queue and stalled the event loop under overload (benchmarks/overload.py).
        self._tenant_tokens: dict[str | None, int] = {}
        self._deficit: dict[str | None, int] = {}  # deficit round robin: tokens each tenant may still send
        self._turn: deque[str | None] = deque()  # tenants in round-robin order; the next one first
        self.on_batch = on_batch
        self._pending: deque[_Request] = deque()  # requests with rows not yet in a batch, FIFO
        self._background: deque[_Request] = deque()  # the same, run only when _pending is empty
        self._running: set[_Request] = set()
        self._tokenizing = 0  # admitted requests waiting for (or in) the tokenizer thread: they wait too
        self._last_arrival = float("-inf")
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        # Forward passes run on the process's compute thread (compute.py); tokenizing has its own thread so
        # a new request is tokenized while a batch runs, never on the event loop.
        self._token_thread = ThreadPoolExecutor(1, thread_name_prefix="classify-tokenize")

    @property
    def queue_depth(self) -> int:
        """Requests waiting with no row started yet (being tokenized or queued for a batch)."""
        return self._tokenizing + sum(1 for r in self._pending if not r.started)

    @property
    def running(self) -> int:
        """Requests with at least one row in a batch and not finished."""
        return len(self._running)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="classify-batcher")

    async def stop(self) -> None:
        """Stop batching; requests not finished get a RuntimeError."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for request in [*self._pending, *self._background, *self._running]:
            if not request.future.done():
                request.future.set_exception(RuntimeError("classify batcher stopped"))
        self._pending.clear()
        self._background.clear()
        self._running.clear()
        self._tenant_tokens.clear()
        self._token_thread.shutdown(wait=True)

    async def submit(self, texts: str | Sequence[str] | Sequence[Sequence[int]], slot: int, tenant: str | None = None,
                     on_start: Callable[[float], None] | None = None, *, embed: bool = False,
                     background: bool = False) -> list[Tensor]:
        """Logits for each text through `slot` (trimmed to its label count), or with `embed` its pooled
        embedding; texts may be given as token-id lists (truncated like texts). Raises QueueFullError, also
        when `tenant` already has `max_tenant_tokens` tokens queued. `on_start(seconds)` is called once, with
        the time from submit to the request's first batch (its queue wait, tokenizing included).
        `background`: runs only while nothing else waits (its own queue, of the same bound)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return []
        # Requests still waiting for the tokenizer count: under a burst they queue there, not in _pending.
        if background and len(self._background) >= self.max_queue:
            raise QueueFullError(f"background queue is full ({self.max_queue} requests waiting)")
        if not background and len(self._pending) + self._tokenizing >= self.max_queue:
            raise QueueFullError(f"classification queue is full ({self.max_queue} requests waiting)")
        loop, arrived = asyncio.get_running_loop(), time.perf_counter()
        self._tokenizing += 1
        try:
            if isinstance(texts[0], str):
                rows = await loop.run_in_executor(self._token_thread, self.engine.tokenize, texts)
            else:
                rows = [list(ids)[: self.engine.max_length] for ids in texts]
        finally:
            self._tokenizing -= 1
        request = _Request(rows=rows, slot=slot, future=loop.create_future(), results=[None] * len(rows),
                           tenant=tenant, on_start=on_start, arrived=arrived, embed=embed,
                           tokens_left=sum(map(len, rows)))
        queued = self._tenant_tokens.get(tenant, 0)
        if queued and queued + request.tokens_left > self.max_tenant_tokens:
            raise QueueFullError(f"this key already has {queued} tokens queued for classification"
                                 f" (limit {self.max_tenant_tokens}); retry when they are done")
        self._tenant_tokens[tenant] = queued + request.tokens_left
        # Sparse traffic (the previous request came more than max_wait ago): waiting would most likely only
        # add latency, so the request runs at once. Bursts (arrivals closer than max_wait) still wait and
        # share batches, and requests that arrive while a batch runs are batched together anyway.
        if background:
            self._background.append(request)
        else:
            request.sparse = request.submitted - self._last_arrival > self.max_wait
            self._last_arrival = request.submitted
            self._pending.append(request)
        self._wakeup.set()
        try:
            return await request.future
        finally:
            if request.future.cancelled():  # the caller went away: drop its rows, stop counting it
                self._finish(request, None)

    # The loop ---------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            while not self._pending and not self._background:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._pending:
                await self._wait_for_more()
            for batch in self._next_batches():
                await self._run(batch)

    async def _wait_for_more(self) -> None:
        """Wait up to max_wait after the oldest request arrived, unless a full batch is already waiting or
        the only request waiting is a sparse one."""
        if len(self._pending) == 1 and self._pending[0].sparse:
            return
        deadline = self._pending[0].submitted + self.max_wait
        while self._waiting_rows() < self.max_batch_size:
            timeout = deadline - time.perf_counter()
            if timeout <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except asyncio.TimeoutError:
                return

    def _waiting_rows(self) -> int:
        return sum(len(r.rows) - r.next_row for r in self._pending)

    def _take_window(self) -> tuple[list[tuple[_Request, int]], bool]:
        """The rows of the next window, and whether tenants share it (its batches are then short).
        Without tenants (auth off): FIFO, up to 4 batches' worth of rows. With tenants: deficit round robin
        over tokens (each turn a tenant may send its share of shared_batch_tokens more, oldest request
        first) into one short batch, so the loop chooses again after every batch and a tenant arriving at
        any moment waits at most for one short batch: a batch cannot be interrupted, so a lone tenant's
        bulk work is cut short too. Background requests only when no other row waits."""
        for lane in (self._pending, self._background):
            for request in [r for r in lane if r.future.done()]:  # cancelled or failed earlier
                lane.remove(request)
        lane = self._pending or self._background
        queues: dict[str | None, deque[_Request]] = {}
        for request in lane:
            queues.setdefault(request.tenant, deque()).append(request)
        for tenant in list(self._deficit):
            if tenant not in queues:
                del self._deficit[tenant]  # DRR: an idle tenant keeps no credit
        self._turn = deque([t for t in self._turn if t in queues] + [t for t in queues if t not in self._turn])
        several = len(queues) > 1 or None not in queues
        limit, budget = (self.max_batch_size, self.shared_batch_tokens) if several else (4 * self.max_batch_size, None)
        quantum = self.shared_batch_tokens // len(queues) if several else 1 << 62
        window: list[tuple[_Request, int]] = []
        while queues and len(window) < limit and (budget is None or budget > 0):
            before = len(window)
            for tenant in list(self._turn):
                if tenant not in queues:
                    continue
                self._turn.remove(tenant)  # whoever is served now goes to the back of the line
                self._turn.append(tenant)
                queue = queues[tenant]
                credit = self._deficit.get(tenant, 0) + quantum
                while queue and len(window) < limit:
                    request = queue[0]
                    cost = len(request.rows[request.next_row])
                    if cost > credit or (budget is not None and window and cost > budget):
                        break
                    credit -= cost
                    if budget is not None:
                        budget -= cost
                    window.append((request, request.next_row))
                    request.next_row += 1
                    self._running.add(request)
                    if request.next_row == len(request.rows):
                        queue.popleft()
                        lane.remove(request)
                self._deficit[tenant] = credit if queue and several else 0
                if not queue:
                    del queues[tenant]
                if len(window) >= limit or (budget is not None and budget <= 0):
                    break
            if window and len(window) == before:  # the next rows do not fit in what is left of the batch
                break
        return window, several

    def _next_batches(self) -> list[list[tuple[_Request, int]]]:
        """Take a window of rows (`_take_window`), sort it by length (so padding is small) and cut it into
        batches within the row and padded-token limits. Rows beyond the window wait, so an oversized
        request is split across batches and the oldest rows always go first."""
        window, shared = self._take_window()
        window.sort(key=lambda item: len(item[0].rows[item[1]]))
        max_tokens = self.shared_batch_tokens if shared else self.max_batch_tokens
        batches, current, width = [], [], 0
        for item in window:
            length = len(item[0].rows[item[1]])
            new_width = max(width, length)
            # Shared between tenants, a batch also keeps to rows within 2x of its shortest: a one-word
            # request then runs with rows like it, not padded to and timed by another key's long texts.
            spread = shared and length > 2 * len(current[0][0].rows[current[0][1]]) if current else False
            if current and (
                spread or len(current) >= self.max_batch_size or new_width * (len(current) + 1) > max_tokens
            ):
                batches.append(current)
                current, new_width = [], length
            current.append(item)
            width = new_width
        if current:
            batches.append(current)
        return batches

    async def _run(self, batch: list[tuple[_Request, int]]) -> None:
        batch = [(r, i) for r, i in batch if not r.future.done()]
        if not batch:
            return
        requests = list(dict.fromkeys(r for r, _ in batch))
        started = time.perf_counter()
        rows = [r.rows[i] for r, i in batch]
        slots = [r.slot for r, _ in batch]
        embed = [r.embed for r, _ in batch]
        # Only batches with embedding rows pass `embed`: an engine that only classifies keeps run(rows, slots).
        extra = (embed,) if any(embed) else ()
        try:
            out = await compute.arun(self.engine.run, rows, slots, *extra)
        except Exception as exc:  # a failing batch fails its own requests only; the loop goes on
            for request in requests:
                self._finish(request, exc)
            return
        try:  # metrics must never break serving
            for request in requests:
                if request.on_start is not None:
                    request.on_start(started - request.arrived)
                    request.on_start = None  # its first batch only
            if self.on_batch is not None:
                self.on_batch(len(batch), len(set(slots)), [started - r.submitted for r in requests])
        except Exception:
            pass
        for (request, i), logits in zip(batch, out, strict=True):
            if request.future.done():
                continue
            if not bool(torch.isfinite(logits).all()):  # this request's adapter overflowed: it fails alone
                self._finish(request, RowFailedError(f"the model produced non-finite scores for input {i}"))
                continue
            request.results[i] = logits
            request.done_rows += 1
            self._count_done(request, len(request.rows[i]))
            if request.done_rows == len(request.rows):
                self._finish(request, None)

    def _count_done(self, request: _Request, tokens: int) -> None:
        """`tokens` of `request` no longer count against its tenant (results back, failed or cancelled)."""
        request.tokens_left -= tokens
        left = self._tenant_tokens.get(request.tenant, 0) - tokens
        if left > 0:
            self._tenant_tokens[request.tenant] = left
        else:
            self._tenant_tokens.pop(request.tenant, None)

    def _finish(self, request: _Request, exc: BaseException | None) -> None:
        """Take `request` out of the queues and the tenant's count; resolve its future unless it is done."""
        self._running.discard(request)
        for lane in (self._pending, self._background):
            if request in lane:
                lane.remove(request)
        self._count_done(request, request.tokens_left)
        if request.future.done():
            return
        if exc is None:
            request.future.set_result(request.results)
        else:
            request.future.set_exception(exc)
