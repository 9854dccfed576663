"""GeneratorEngine: continuous-batching text generation with per-request LoRA slots, driven by one
background thread (scheduler → model runner → scheduler); asyncio callers stream `Delta`s from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from adapters.errors import ContextLengthError, OverloadedError
from adapters.format import AdapterWeights
from service.engine import compute
from service.engine.cuda_graphs import DecodeGraphs
from service.engine.decoders import decoder_for
from service.engine.kv_cache import KVCache
from service.engine.lora_model import inject_multi_lora
from service.engine.model_runner import ModelRunner
from service.engine.protocol import EngineStats, StepObserver
from service.engine.quantize import prepare_block_linears
from service.engine.sampling import SamplingParams
from service.engine.scheduler import Scheduler
from service.engine.sequence import Sequence

if TYPE_CHECKING:
    from service.config import Settings

log = logging.getLogger(__name__)


class EngineOverloadedError(OverloadedError):
    """Too many requests are waiting for a KV row; the API answers 429 + Retry-After."""


@dataclass
class Delta:
    """What one step produced for one request. Counts are cumulative (for `usage`)."""

    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" | "length" | None
    prompt_tokens: int
    completion_tokens: int
    queue_wait: float | None = None  # first delta only: seconds from generate() to the request's prefill


class Detokenizer:
    """Incremental detokenization with stop strings.

    Decoding token by token breaks multi-byte characters and word-piece spacing, so (like vLLM) each step
    decodes a short window ending at the new token and keeps only text that is complete (no trailing
    U+FFFD). Text that could be the beginning of a stop string is held back until it is known not to be.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        # A few prompt tokens of context make the first generated word-piece decode with its leading space.
        self.ids = list(prompt_ids[-4:])
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""
        self.sent = 0
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix : self.read])
        new_text = self._decode(self.ids[self.prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text) :]
            self.prefix, self.read = self.read, len(self.ids)

    def flush(self) -> None:
        """At the end, keep whatever the incomplete tail decodes to (replacement characters included)."""
        prefix_text = self._decode(self.ids[self.prefix : self.read])
        new_text = self._decode(self.ids[self.prefix :])
        if len(new_text) > len(prefix_text):
            self.text += new_text[len(prefix_text) :]
        self.prefix = self.read = len(self.ids)

    def take(self, final: bool) -> tuple[str, bool]:
        """(text to send now, whether a stop string was found). After a stop, the text ends before it."""
        if self.stop:
            start = max(0, self.sent - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                out, self.sent = self.text[self.sent :], len(self.text)
                return out, True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent : end], end
        return out, False


class _Stream:
    """The asyncio side of one request: where its deltas go, and its text state (engine thread only)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, detok: Detokenizer) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self.detok = detok
        self.sent_tokens = 0

    def put(self, item: Delta | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class GeneratorEngine:
    """Implements `Engine` (engine/protocol.py) for generation adapters."""

    tasks = frozenset({"generation"})
    base_labels = None

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        base_info: Any,
        *,
        num_slots: int = 9,
        max_rank: int = 64,
        max_num_seqs: int = 16,
        max_model_len: int = 2048,
        max_num_batched_tokens: int = 4096,
        max_waiting: int = 256,
        max_tenant_tokens: int = 1 << 18,
        targets: str | Seq[str] | None = None,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        cuda_graphs: bool = True,
        quantization: str = "none",
    ) -> None:
        model = model.to(device=device, dtype=dtype).eval()
        # Before anything changes the model: refuse a family or feature the runner would not serve exactly.
        # This decoder is read for sizes only; the runner builds its own over the wrapped linears.
        dec = decoder_for(model)
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", None
        )
        if limit:
            max_model_len = min(max_model_len, limit)
        if dec.max_positions is not None and max_model_len > dec.max_positions:
            log.warning("%s is served exactly up to %d positions only: max_model_len %d -> %d",
                        model.config.model_type, dec.max_positions, max_model_len, dec.max_positions)  # fmt: skip
            max_model_len = dec.max_positions
        self.model, self.tokenizer, self.base_info = model, tokenizer, base_info
        self.device = torch.device(device)  # the host cache page-locks adapters for a CUDA engine
        self.num_slots, self.max_rank = num_slots, max_rank
        self.max_model_len, self.max_waiting = max_model_len, max_waiting
        self.max_tenant_tokens = max_tenant_tokens  # prompt tokens one API key may have in flight
        self._tenant_tokens: dict[str | None, int] = {}  # event-loop side only: no lock needed
        # Targets None = every linear inside the transformer blocks (q/k/v/o and MLP), never lm_head.
        self.slots = inject_multi_lora(model, targets, num_slots, max_rank, dtype)
        # Base block linears: int8, int4 or oneDNN-packed fp32 (quantize.prepare_block_linears); after
        # injection, so LoRA wraps keep their paths and their stacks stay in the engine's dtype.
        self.linears = prepare_block_linears(model, quantization)
        self.kv_cache = KVCache(
            len(dec.blocks),
            dec.num_kv_heads,
            dec.head_dim,
            max_num_seqs,
            max_model_len,
            dtype=dtype,
            device=device,
        )
        self.scheduler = Scheduler(self.kv_cache, max_num_batched_tokens, self._eos_ids(model, tokenizer))
        self.runner = ModelRunner(model, self.kv_cache, self.slots)
        if cuda_graphs and self.device.type == "cuda":
            self.runner.graphs = DecodeGraphs(self.runner, max_num_seqs, self.kv_cache.max_model_len)
        self._streams: dict[int, _Stream] = {}
        self._inbox: deque[Sequence] = deque()
        self._aborts: deque[int] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.on_step: StepObserver | None = None

    @staticmethod
    def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
        ids: set[int] = set()
        for source in (
            getattr(tokenizer, "eos_token_id", None),
            getattr(model.generation_config, "eos_token_id", None),
        ):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    # --- Engine -------------------------------------------------------------------------------------
    async def start(self, settings: Settings, on_step: StepObserver | None = None) -> None:
        """The engine thread starts on the first request; its limits were set at construction."""
        self.on_step = on_step

    async def stop(self) -> None:
        await asyncio.to_thread(self.shutdown)

    def stats(self) -> EngineStats:
        return EngineStats(running=self.running, waiting=self.waiting, kv_cache_usage=self.kv_cache.usage)

    def load_slot(self, slot: int, weights: AdapterWeights) -> None:
        """Copy an adapter (`.lora`) into `slot`, on the compute thread. The caller guarantees no running
        request uses it."""
        compute.run(self.slots.load, slot, weights.lora)

    def clear_slot(self, slot: int) -> None:
        compute.run(self.slots.clear, slot)

    # --- metrics --------------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._inbox)

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_cache.usage

    @property
    def running_slots(self) -> list[int]:
        return sorted({s.slot for s in list(self.scheduler.running)})

    @property
    def waiting_slots(self) -> list[int]:
        return sorted({s.slot for s in list(self.scheduler.waiting) + list(self._inbox)})

    # --- engine thread lifecycle -----------------------------------------------------------------------
    def _start_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="generator-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the engine thread (blocking); requests not finished fail."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # --- requests -------------------------------------------------------------------------------------
    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, slot: int = 0, tenant: str | None = None
    ) -> AsyncIterator[Delta]:
        """Stream deltas for one request. Raises ContextLengthError (prompt too long) or EngineOverloadedError
        before the first delta (also when `tenant`, an API key, already has `max_tenant_tokens` prompt
        tokens in flight); closing/cancelling the iterator frees the sequence within one step."""
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot must be in [0, {self.num_slots}), got {slot}")
        if len(prompt_ids) >= self.max_model_len:
            raise ContextLengthError(
                f"prompt has {len(prompt_ids)} tokens; this model's context is {self.max_model_len} tokens"
            )
        if self.waiting >= self.max_waiting:
            raise EngineOverloadedError(f"{self.waiting} requests are waiting; retry later")
        held = self._tenant_tokens.get(tenant, 0)
        if tenant is not None and held and held + len(prompt_ids) > self.max_tenant_tokens:
            raise EngineOverloadedError(f"this key has {held} prompt tokens in flight (limit {self.max_tenant_tokens})")
        self._tenant_tokens[tenant] = held + len(prompt_ids)
        try:
            async with contextlib.aclosing(self._generate(Sequence(list(prompt_ids), params, slot, tenant))) as deltas:
                async for delta in deltas:
                    yield delta
        finally:
            left = self._tenant_tokens[tenant] - len(prompt_ids)
            if left:
                self._tenant_tokens[tenant] = left
            else:
                del self._tenant_tokens[tenant]

    async def _generate(self, seq: Sequence) -> AsyncIterator[Delta]:
        params = seq.params
        stream = _Stream(asyncio.get_running_loop(), Detokenizer(self.tokenizer, seq.token_ids, params.stop))
        self._streams[seq.seq_id] = stream
        self._start_thread()
        with self._wake:
            self._inbox.append(seq)
            self._wake.notify()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                with self._wake:
                    self._aborts.append(seq.seq_id)
                    self._wake.notify()

    # --- engine thread --------------------------------------------------------------------------------
    def _take_inbox(self) -> tuple[list[Sequence], set[int]] | None:
        """Wait for something to do; the new requests and aborts, or None when stopping."""
        with self._wake:
            while not (self._inbox or self._aborts or self.scheduler.has_work() or self._stopping):
                self._wake.wait()
            if self._stopping:
                return None
            new, self._inbox = list(self._inbox), deque()
            aborts, self._aborts = set(self._aborts), deque()
        return new, aborts

    def _admit(self, new: list[Sequence], aborts: set[int]) -> None:
        for seq in new:
            if seq.seq_id in aborts:
                self._streams.pop(seq.seq_id, None)
                continue
            self.scheduler.add(seq)
        if aborts:
            for seq in list(self.scheduler.waiting) + list(self.scheduler.running):
                if seq.seq_id in aborts:
                    self.scheduler.finish(seq, "abort")
                    self._streams.pop(seq.seq_id, None)

    def _loop(self) -> None:
        """This thread waits; each round's work (admitting, one step, emitting) runs on the compute thread
        (compute.py: torch's threads stay fast only when one thread runs all of the model work)."""
        while (taken := self._take_inbox()) is not None:
            compute.run(self._round, *taken)
        compute.run(self._fail_all, RuntimeError("the generation engine stopped"))

    def _round(self, new: list[Sequence], aborts: set[int]) -> None:
        self._admit(new, aborts)
        if not self.scheduler.has_work():
            return
        seqs, is_prefill = self.scheduler.schedule()
        if is_prefill:
            now = time.perf_counter()
            for seq in seqs:
                seq.queue_wait = now - seq.arrival
        try:
            tokens = self.runner.run(seqs, is_prefill)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the engine thread
            log.exception("generation step failed")
            self._fail(seqs, [exc] * len(seqs))
            return
        self.steps += 1
        if self.on_step is not None:
            try:
                self.on_step(len(seqs), len({s.slot for s in seqs}))
            except Exception:  # noqa: BLE001 - metrics must never break serving
                log.exception("step observer failed")
        # A row that gave no token (non-finite logits, a sampling error) ends its own request only. The
        # others are recorded first: freeing a failed row's KV moves other rows' caches, and those moves
        # must include what this step wrote.
        good = [(seq, t) for seq, t in zip(seqs, tokens, strict=True) if not isinstance(t, Exception)]
        bad = [(seq, t) for seq, t in zip(seqs, tokens, strict=True) if isinstance(t, Exception)]
        for seq, _ in bad:  # before any row moves: a moved row leaves its old copy behind
            self.kv_cache.scrub(seq)
        self.scheduler.postprocess([s for s, _ in good], [t for _, t in good])
        self._end([s for s, _ in bad], [t for _, t in bad])
        for seq, _ in good:
            try:
                self._emit(seq)
            except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer failing on one row's ids
                log.exception("detokenizing a generation row failed")
                self._fail([seq], [exc])

    def _fail(self, seqs: list[Sequence], errors: list[BaseException]) -> None:
        """End these sequences, each with its error for its caller; the engine and the others go on. Their
        K/V rows are zeroed before any is freed (freeing moves rows): a failed row may hold NaN, which
        masked attention would still carry into other rows (0 x NaN)."""
        for seq in seqs:
            self.kv_cache.scrub(seq)
        self._end(seqs, errors)

    def _end(self, seqs: list[Sequence], errors: list[BaseException]) -> None:
        """Finish these (already scrubbed) sequences and hand each caller its error."""
        for seq, exc in zip(seqs, errors, strict=True):
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
            stream = self._streams.pop(seq.seq_id, None)
            if stream is not None:
                stream.put(exc)

    def _emit(self, seq: Sequence) -> None:
        stream = self._streams.get(seq.seq_id)
        if stream is None:
            return
        token = seq.last_token
        detok = stream.detok
        is_eos = seq.finish_reason == "stop"  # the EOS token itself is not part of the text
        if not is_eos:
            detok.push(token)
        if seq.is_finished:
            detok.flush()
        text, stopped = detok.take(final=seq.is_finished)
        if stopped and not seq.is_finished:
            self.scheduler.finish(seq, "stop")
        new_ids = seq.completion_ids[stream.sent_tokens :]
        first = stream.sent_tokens == 0
        stream.sent_tokens += len(new_ids)
        stream.put(Delta(new_ids, text, seq.finish_reason, seq.num_prompt_tokens, seq.num_completion_tokens,
                         seq.queue_wait if first else None))
        if seq.is_finished:
            self._streams.pop(seq.seq_id, None)

    def _fail_all(self, exc: BaseException) -> None:
        for seq in list(self.scheduler.waiting) + list(self.scheduler.running):
            self.scheduler.finish(seq, "abort")
        for stream in self._streams.values():
            stream.put(exc)
        self._streams.clear()
