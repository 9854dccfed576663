"""Tensors in, tokens out: runs a Hugging Face decoder's own modules (embeddings, norms, LoRA-wrapped
linears, MLPs, lm_head) layer by layer, with attention written here over the engine's KV cache.
What differs between decoder families is in decoders.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.engine.decoders import decoder_for
from service.engine.kv_cache import KVCache
from service.engine.lora import SlotGroups
from service.engine.lora_model import LoraSlots
from service.engine.packed_linear import PackedLinear, can_pack
from service.engine.sampling import RowFailedError, sample_rows
from service.engine.sequence import Sequence


def output_projection(lm_head: nn.Module) -> Callable[[Tensor], Tensor]:
    """lm_head as the runner calls it: packed for oneDNN on CPU fp32 (see packed_linear.py; for the tall
    [vocab, hidden] weight at SmolLM2-135M decode shapes, 16 rows, ~1.7x faster than F.linear), anything
    else as it is. The model keeps its own lm_head, whose weight tied input embeddings read by rows, so the
    packed copy costs vocab x hidden more memory."""
    return PackedLinear(lm_head) if can_pack(lm_head) else lm_head


def decode_bias(mask: Tensor, dtype: torch.dtype) -> Tensor | None:
    """The additive form of a bool attention mask, for `attend`'s CPU fp32 decode path (once per
    forward, shared by every layer); None where that path is not taken."""
    if mask.device.type != "cpu" or dtype != torch.float32:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, bias: Tensor | None, scale: float, softcap: float | None = None
) -> Tensor:
    """softmax(q k^T * scale, masked) v. With `bias` (CPU decode, one query per head: the kernel reads
    the whole cache span for a few query rows) two matmuls and a softmax, ~40 % faster than CPU
    `scaled_dot_product_attention` at SmolLM2-135M decode shapes, 16 rows x ~110 positions
    (benchmarks/README.md); everything else goes to `scaled_dot_product_attention`, except soft-capped
    scores (softcap * tanh(scores / softcap), Gemma2), which SDPA cannot compute: those take the matmul path
    in the order HF's eager attention uses (cap, then mask, softmax in fp32). Every query sees at least its
    own position, so no row of the softmax is all -inf."""
    if bias is None and softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    scores = scores.add_(bias) if bias is not None else scores.masked_fill_(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), v)


def attention_mask(positions: Tensor, span: int, groups: int, window: int | None) -> Tensor:
    """mask[b, 0, g*T + t, j]: query t of row b sees cache position j iff j <= its own position p (causal,
    and hides whatever an earlier owner or right padding left beyond the row's length) and, with a sliding
    `window`, j > p - window (HF's sliding-window mask). The G query heads sharing a KV head repeat it."""
    j = torch.arange(span, device=positions.device).view(1, 1, span)
    p = positions.unsqueeze(-1)
    mask = j <= p
    if window is not None:
        mask &= j > p - window
    return mask.unsqueeze(1).repeat(1, 1, groups, 1) if groups > 1 else mask.unsqueeze(1)  # [B, 1, G*T, span]


class ModelRunner:
    """Runs one step for a batch of sequences and samples their next tokens.

    Attention is the one part written here: new K/V go into the engine's cache rows, then queries attend
    to cache positions <= their own (`attend`). GQA folds the query heads that
    share a KV head into the query-length axis, so no K/V is repeated. Rows of a batch are a contiguous
    range of cache rows (the KV cache keeps them dense), so reads and writes use views, not gathers.
    """

    def __init__(self, model: nn.Module, kv_cache: KVCache, slots: LoraSlots | None = None) -> None:
        self.model = model
        self.decoder = decoder_for(model)
        self.kv_cache = kv_cache
        self.slots = slots
        self.device = next(model.parameters()).device
        self.lm_head = output_projection(self.decoder.lm_head)
        self.graphs = None  # DecodeGraphs (cuda_graphs.py) when the engine replays decode from CUDA graphs

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int | RowFailedError]:
        """One step: each sequence's next token, or the error that ends that sequence alone."""
        if is_prefill:
            logits = self.prefill(seqs)
        else:
            logits = self.decode(seqs) if self.graphs is None else self.graphs.logits(seqs)
        return sample_rows(logits, [s.params for s in seqs], [s.generator for s in seqs])

    def prefill(self, seqs: list[Sequence]) -> Tensor:
        """All uncached tokens of each sequence, right-padded to one [B, T] batch; logits of the last real token."""
        starts = [s.num_cached for s in seqs]
        chunks = [s.token_ids[s.num_cached :] for s in seqs]
        width = max(len(c) for c in chunks)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, c in enumerate(chunks):
            ids[i, : len(c)] = torch.tensor(c)
        positions = torch.tensor(starts).unsqueeze(1) + torch.arange(width).unsqueeze(0)
        # Padding positions may run past the context end: clamp (their outputs are never read).
        positions = positions.clamp_(max=self.kv_cache.max_model_len - 1)
        last = torch.tensor([len(c) - 1 for c in chunks])
        return self._forward(seqs, ids, positions, last)

    def decode(self, seqs: list[Sequence]) -> Tensor:
        ids = torch.tensor([[s.last_token] for s in seqs])
        positions = torch.tensor([[s.num_cached] for s in seqs])
        return self._forward(seqs, ids, positions, torch.zeros(len(seqs), dtype=torch.long))

    def decode_static(self, ids: Tensor, positions: Tensor, slot_ids: Tensor | None, span: int) -> Tensor:
        """One decode step over cache rows 0..B-1 with every shape fixed by (B, span) and no host sync:
        the body of a CUDA graph (cuda_graphs.py). ids, positions [B, 1] and slot_ids [B] (None: no LoRA)
        live on the model's device; `span` >= every position + 1 bounds what attention reads."""
        rows = slice(0, ids.shape[0])
        if slot_ids is None or self.slots is None:
            hidden = self._layers(ids, positions, rows, span=span)
        else:
            with self.slots.use_static(slot_ids):
                hidden = self._layers(ids, positions, rows, span=span)
        return self._logits(hidden[:, 0])

    def _forward(self, seqs: list[Sequence], ids: Tensor, positions: Tensor, last: Tensor) -> Tensor:
        dev = self.device
        ids, positions = ids.to(dev), positions.to(dev)
        rows = [s.row for s in seqs]
        lo = rows[0]
        if rows != list(range(lo, lo + len(rows))):
            raise RuntimeError(f"batch rows {rows} are not contiguous; the KV cache keeps them dense")
        slot_ids = [s.slot for s in seqs]  # routing metadata is built from these host ids (LoraSlots.use)
        if self.slots is None:
            if any(slot_ids):
                raise ValueError("this runner has no LoRA slots")
            hidden = self._layers(ids, positions, slice(lo, lo + len(rows)))
        else:
            # Decode (one token per row) asks for the slot-grouped layout; prefill rows are long enough
            # that LoRA gathers per row instead (see lora._add_lora_cpu).
            with self.slots.use(slot_ids, laid_out=ids.shape[1] == 1) as layout:
                hidden = self._layers(ids, positions, slice(lo, lo + len(rows)), layout)
        hidden = hidden[
            torch.arange(len(seqs), device=dev), last.to(dev)
        ]  # [B, hidden]: lm_head on 1 token/row
        return self._logits(hidden)

    def _logits(self, hidden: Tensor) -> Tensor:
        """fp32 logits from the last hidden states; soft-capped in the model's dtype where the family caps."""
        logits = self.lm_head(self.decoder.final_norm(hidden))
        cap = self.decoder.logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def _layers(
        self, ids: Tensor, positions: Tensor, rows: slice, layout: SlotGroups | None = None, span: int | None = None
    ) -> Tensor:
        """Hidden states [B, T, hidden] after the last block. With `layout` (mixed adapters in decode) the
        rows go through every linear in the slots' padded layout, scattered once here rather than in
        each of the ~200 wrapped linears; attention, which reads the KV cache by row, sees the real rows
        in batch order. Padding rows carry a dummy token through the linears and are never read.
        `span` given (decode_static): attention reads that many cache positions and every row writes its
        own position, so nothing depends on the positions' values on the host."""
        d = self.decoder
        B, T = ids.shape
        H, Hkv, hd = d.num_heads, d.num_kv_heads, d.head_dim
        G = H // Hkv
        if layout is None:
            x, rope = d.embed(ids, positions)
        else:
            padded = layout.count * layout.width
            x, rope = d.embed(
                ids.new_zeros(padded, T).index_copy_(0, layout.index, ids),
                positions.new_zeros(padded, T).index_copy_(0, layout.index, positions),
            )
            rope = None if rope is None else tuple(t.index_select(0, layout.index) for t in rope)
        static = span is not None
        if span is None:
            span = int(positions.max()) + 1  # cache positions any query of this batch may see
        # One mask per distinct sliding window (a window no position can reach is full attention), and its
        # additive form for the CPU fp32 decode path, built once per forward and shared by the blocks.
        masks: dict[int | None, tuple[Tensor, Tensor | None]] = {}
        for window in {blk.window for blk in d.blocks}:
            key = window if window is not None and window < span else None
            if key not in masks:
                mask = attention_mask(positions, span, G, key)
                masks[key] = mask, decode_bias(mask, x.dtype) if T == 1 else None
            masks[window] = masks[key]
        first = 0 if static else int(positions[:, 0].min())
        uniform_start = not static and bool((positions[:, 0] == first).all())
        for layer, blk in enumerate(d.blocks):
            h = blk.norm1(x)
            q, k, v = blk.qkv(h)
            if layout is not None:
                q, k, v = (t.index_select(0, layout.index) for t in (q, k, v))
            q, k = q.view(B, T, H, hd), k.view(B, T, Hkv, hd)
            if blk.q_norm is not None:  # per head, before RoPE (Qwen3)
                q, k = blk.q_norm(q), blk.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = v.view(B, T, Hkv, hd).transpose(1, 2)
            if rope is not None:
                q, k = d.apply_rope(q, k, *rope)
            k_cache, v_cache = self.kv_cache.k[layer, rows], self.kv_cache.v[layer, rows]
            if uniform_start:  # prefill from position 0 (or any shared start): one slice write
                k_cache[:, :, first : first + T].copy_(k)
                v_cache[:, :, first : first + T].copy_(v)
            else:  # decode: each row writes its own position
                b = torch.arange(B, device=ids.device).unsqueeze(1)
                k_cache.transpose(1, 2)[b, positions] = k.transpose(1, 2)
                v_cache.transpose(1, 2)[b, positions] = v.transpose(1, 2)
            # [B, H, T, hd] -> [B, Hkv, G*T, hd]: query heads h*G..h*G+G-1 share KV head h.
            qg = q.reshape(B, Hkv, G * T, hd)
            mask, bias = masks[blk.window]
            out = attend(qg, k_cache[:, :, :span], v_cache[:, :, :span], mask, bias, blk.scaling, blk.softcap)
            out = out.view(B, H, T, hd).transpose(1, 2).reshape(B, T, H * hd)
            if layout is not None:
                out = out.new_zeros(x.shape[0], T, H * hd).index_copy_(0, layout.index, out)
            x = x + _maybe(blk.post_attn_norm, blk.out_proj(out))
            x = x + _maybe(blk.post_mlp_norm, blk.mlp(blk.norm2(x)))
        return x if layout is None else x.index_select(0, layout.index)


def _maybe(norm: nn.Module | None, x: Tensor) -> Tensor:
    return x if norm is None else norm(x)
