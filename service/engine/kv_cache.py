"""The engine's KV memory: a static per-sequence cache [layers, rows, kv_heads, max_model_len, head_dim]
and its bookkeeping (which row each running sequence owns). The model runner reads and writes the tensors.
"""

from __future__ import annotations

import torch

from service.engine.sequence import Sequence


class KVCache:
    """One row per running sequence, each long enough for `max_model_len` tokens.

    Why static rows rather than paged blocks: on CPU the batch is small (<= ~32 sequences) and
    contexts short, so a row per sequence wastes little and lets decode attend with plain
    `scaled_dot_product_attention` over a *view* of the cache. Rows stay dense (0..n-1): freeing a row
    moves the highest used row into the hole, so the running batch is always `rows[:n]` and no step
    gathers the cache. Admission control is "a row is free"; a running sequence never runs out of KV
    memory, so no preemption is needed.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_num_seqs: int,
        max_model_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        shape = (num_layers, max_num_seqs, num_kv_heads, max_model_len, head_dim)
        # torch.zeros maps untouched pages lazily on CPU: memory grows with what is used.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.owners: list[Sequence | None] = [None] * max_num_seqs
        self.num_used = 0

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @property
    def usage(self) -> float:
        """Fraction of rows held by running sequences (what admission depends on), 0..1."""
        return self.num_used / self.max_num_seqs

    def can_allocate(self) -> bool:
        return self.num_used < self.max_num_seqs

    def allocate(self, seq: Sequence) -> int:
        if not self.can_allocate():
            raise RuntimeError("no free KV cache row")
        if seq.row is not None:
            raise RuntimeError(f"{seq} already holds row {seq.row}")
        row = self.num_used
        self.owners[row] = seq
        self.num_used += 1
        seq.row, seq.num_cached = row, 0
        return row

    def scrub(self, seq: Sequence) -> None:
        """Zero `seq`'s row. Attention masks positions a row does not own, but a masked NaN still poisons the
        weighted sum (0 x NaN): a failed sequence's K/V (a broken adapter) must not outlive it."""
        if seq.row is not None:
            self.k[:, seq.row].zero_()
            self.v[:, seq.row].zero_()

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s row; the last used row moves into it so that used rows stay 0..n-1."""
        row = seq.row
        if row is None:
            return
        if self.owners[row] is not seq:
            raise RuntimeError(f"{seq} does not own row {row}")
        last = self.num_used - 1
        if row != last:
            mover = self.owners[last]
            assert mover is not None
            n = mover.num_cached
            self.k[:, row, :, :n].copy_(self.k[:, last, :, :n])
            self.v[:, row, :, :n].copy_(self.v[:, last, :, :n])
            self.owners[row], mover.row = mover, row
        self.owners[last] = None
        self.num_used -= 1
        seq.row, seq.num_cached = None, 0
