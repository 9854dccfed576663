"""Decode steps replayed from CUDA graphs: on a GPU a decode step of a small model is mostly kernel-launch
overhead (~200 wrapped linears, each a few kernels), which one graph replay removes.

One graph per (batch bucket, span bucket, adapters or not), captured the first time a step needs it
and sharing one memory pool (nano-vllm and vLLM capture the same way). Inputs go through static buffers:
a batch of n rows is padded to the next bucket with dummy rows (token 0 at position 0 in cache rows n..;
the KV cache keeps the running rows at 0..n-1, so those rows are free, and a sequence that later gets
one writes its own K/V over them). The span bucket bounds how many cache positions attention reads.
The body is `ModelRunner.decode_static`, which has no host sync and no branch on the inputs' values.

`capture=False` runs that same body eagerly on the same buffers: the CPU tests check padding, spans and
the static LoRA path against the eager decode with it, since CUDA graphs themselves need a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from service.engine.sequence import Sequence

log = logging.getLogger(__name__)


def _buckets(limit: int, small: tuple[int, ...], step: int) -> list[int]:
    """`small` sizes, then multiples of `step`, then `limit` itself; all <= limit."""
    sizes = {s for s in small if s < limit} | set(range(step, limit, step)) | {limit}
    return sorted(sizes)


@dataclass
class _Graph:
    replay: Callable[[], None]
    logits: Tensor  # [bucket, vocab], rewritten by every replay


class _Eager:
    """Stands in for a captured graph where there is none (capture=False): runs the body per replay."""

    def __init__(self, body: Callable[[], Tensor]) -> None:
        self.body, self.logits = body, torch.empty(0)

    def replay(self) -> None:
        self.logits = self.body()


class DecodeGraphs:
    """Captured decode steps for one ModelRunner (set as `runner.graphs`; `ModelRunner.run` uses it)."""

    def __init__(self, runner, max_num_seqs: int, max_model_len: int, capture: bool = True) -> None:
        self.runner = runner
        self.capture = capture
        self.batch_sizes = _buckets(max_num_seqs, (1, 2, 4, 8), 16)
        self.spans = _buckets(max_model_len, (), 256)
        dev = runner.device
        self.ids = torch.zeros(max_num_seqs, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_num_seqs, 1, dtype=torch.long, device=dev)
        self.slot_ids = torch.zeros(max_num_seqs, dtype=torch.long, device=dev)
        self.graphs: dict[tuple[int, int, bool], _Graph | _Eager] = {}
        self.pool = None
        self.failed = False  # a capture failed: decode runs eagerly from then on

    def key(self, seqs: list[Sequence]) -> tuple[int, int, bool]:
        """(batch bucket, span bucket, any adapter) for a decode batch."""
        n = len(seqs)
        longest = max(s.num_cached for s in seqs) + 1
        bucket = next(b for b in self.batch_sizes if b >= n)
        span = next(s for s in self.spans if s >= longest)
        return bucket, span, any(s.slot != 0 for s in seqs)

    def logits(self, seqs: list[Sequence]) -> Tensor:
        """[len(seqs), vocab] logits of one decode step, like `ModelRunner.decode`. Valid until the next
        step: graphs share one pool, so a replay may overwrite another graph's output (clone to keep)."""
        n = len(seqs)
        if self.failed or n > self.batch_sizes[-1] or [s.row for s in seqs] != list(range(n)):
            return self.runner.decode(seqs)  # the graphs cover rows 0..bucket-1 only
        key = self.key(seqs)
        bucket = key[0]
        host = torch.tensor([[s.last_token, s.num_cached, s.slot] for s in seqs], dtype=torch.long)
        if bucket > n:  # dummy rows: token 0 at position 0, no adapter
            host = torch.cat([host, host.new_zeros(bucket - n, 3)])
        host = host.to(self.ids.device, non_blocking=True)
        self.ids[:bucket, 0].copy_(host[:, 0])
        self.positions[:bucket, 0].copy_(host[:, 1])
        self.slot_ids[:bucket].copy_(host[:, 2])
        graph = self.graphs.get(key)
        if graph is None:
            try:
                graph = self.graphs[key] = self._capture(key)
            except Exception:  # noqa: BLE001 - serving goes on eagerly; the log says why
                log.exception("CUDA graph capture of decode %s failed; decoding eagerly from now on", key)
                self.failed = True
                return self.runner.decode(seqs)
        graph.replay()
        return graph.logits[:n]

    def _body(self, key: tuple[int, int, bool]) -> Tensor:
        bucket, span, adapters = key
        return self.runner.decode_static(self.ids[:bucket], self.positions[:bucket],
                                         self.slot_ids[:bucket] if adapters else None, span)  # fmt: skip

    def _capture(self, key: tuple[int, int, bool]) -> _Graph | _Eager:
        if not self.capture:  # the same body, eagerly (CPU, tests)
            return _Eager(lambda: self._body(key))
        # Warm up on a side stream (lazy inits, cuBLAS workspaces) as torch.cuda.graphs documents; the
        # warm-up writes this step's own K/V, which the replay then writes again, identically.
        previous = torch.cuda.current_stream()
        stream = torch.cuda.Stream()
        stream.wait_stream(previous)
        with torch.cuda.stream(stream):
            self._body(key)
        previous.wait_stream(stream)
        cuda_graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: adapter loads copy into slots from other threads while this thread captures.
            with torch.cuda.graph(cuda_graph, pool=self.pool, capture_error_mode="thread_local"):
                logits = self._body(key)
        except BaseException:
            # A failed capture_end skips torch.cuda.graph's stream restore: put this thread back on its
            # stream, or eager decode would run on the capture stream, unordered with everything else.
            torch.cuda.set_stream(previous)
            torch.cuda.synchronize()
            raise
        self.pool = cuda_graph.pool()
        log.info("captured a CUDA graph for decode (batch %d, span %d, adapters %s)", *key)
        return _Graph(replay=cuda_graph.replay, logits=logits)
