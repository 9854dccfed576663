"""Decides what runs each step (prefill of newly admitted sequences, or one decode step of all running
ones) and applies a step's sampled tokens. No model code and no I/O: tested with plain Sequences.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from adapters.errors import ContextLengthError
from service.engine.kv_cache import KVCache
from service.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    """waiting → running → finished; requests join and leave between any two steps.

    Policy (nano-vllm's): a step is either a prefill or a decode, never both. Prefill goes first when a
    KV row is free, admitting waiting sequences in arrival order while the right-padded batch stays within
    `max_num_batched_tokens` (a prompt longer than the budget runs alone). Otherwise every running
    sequence decodes one token. Alternating keeps both kernels simple; the cost is one decode step's
    delay for the running sequences when a prefill cuts in.
    """

    def __init__(
        self, kv_cache: KVCache, max_num_batched_tokens: int = 4096, eos_token_ids: Iterable[int] = ()
    ) -> None:
        self.kv_cache = kv_cache
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._turn: deque[str | None] = deque()  # tenants in round-robin order for admission

    def _next_waiting(self) -> Sequence:
        """The oldest waiting sequence of the next tenant in turn: one key's burst of long prompts cannot
        take every free KV row and prefill budget ahead of another key's request (FIFO without tenants)."""
        waiting = dict.fromkeys(s.tenant for s in self.waiting)  # in arrival order
        self._turn = deque([t for t in self._turn if t in waiting] + [t for t in waiting if t not in self._turn])
        tenant = self._turn[0]
        return next(s for s in self.waiting if s.tenant == tenant)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if len(seq) >= self.kv_cache.max_model_len:
            raise ContextLengthError(
                f"prompt has {len(seq)} tokens; the context holds {self.kv_cache.max_model_len} "
                "(prompt + at least one generated token)"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Return (sequences to run, is_prefill). Decode batches are ordered by KV row."""
        admitted: list[Sequence] = []
        longest = 0
        while self.waiting and self.kv_cache.can_allocate():
            seq = self._next_waiting()
            padded = (len(admitted) + 1) * max(longest, len(seq))
            if admitted and padded > self.max_num_batched_tokens:
                break
            self.waiting.remove(seq)
            self._turn.rotate(-1)
            self.kv_cache.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            longest = max(longest, len(seq))
        if admitted:
            return admitted, True
        return sorted(self.running, key=lambda s: s.row), False

    def postprocess(self, seqs: list[Sequence], token_ids: list[int]) -> list[Sequence]:
        """Append each sequence's new token; finish those that hit EOS, max_tokens or the context end."""
        live = [
            (seq, token) for seq, token in zip(seqs, token_ids, strict=True) if not seq.is_finished
        ]  # not aborted mid-step
        # First record every sequence's new cache length: freeing a row below moves another sequence's
        # cache, and the move must include the K/V this step just wrote.
        for seq, token in live:
            seq.num_cached = len(seq)
            seq.append_token(token)
        finished = []
        for seq, token in live:
            if not seq.params.ignore_eos and token in self.eos_token_ids:
                self.finish(seq, "stop")
            elif (
                seq.num_completion_tokens >= seq.params.max_tokens or len(seq) >= self.kv_cache.max_model_len
            ):
                self.finish(seq, "length")
            else:
                continue
            finished.append(seq)
        return finished

    def finish(self, seq: Sequence, reason: str) -> None:
        """Stop `seq` (reason "stop" | "length" | "abort") and free its KV row at once."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
            self.kv_cache.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
