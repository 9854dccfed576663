"""Tensors in, tokens out: runs a Hugging Face decoder's own modules (embeddings, norms, LoRA-wrapped
linears, MLPs, lm_head) layer by layer, with attention written here over the engine's KV cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.engine.kv_cache import KVCache
from service.engine.lora import SlotGroups
from service.engine.lora_model import LoraSlots
from service.engine.packed_linear import PackedLinear, can_pack
from service.engine.sampling import sample
from service.engine.sequence import Sequence

QKV = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


@dataclass
class Block:
    """One transformer block as the runner needs it; every callable is the model's own module."""

    norm1: nn.Module
    qkv: QKV  # h [B, T, hidden] -> q [B, T, H*hd], k, v [B, T, Hkv*hd]
    out_proj: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    scaling: float


class Decoder:
    """What differs between decoder families: embeddings, positions, the q/k/v projection."""

    blocks: list[Block]
    final_norm: nn.Module
    lm_head: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def embed(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Token (+ position) embeddings, and the rotary (cos, sin) for `positions` if the family uses RoPE."""
        raise NotImplementedError


class LlamaDecoder(Decoder):
    """Llama family (SmolLM2): RMSNorm, GQA, RoPE, separate q/k/v projections, gated MLP."""

    def __init__(self, model: nn.Module) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cfg = model.config
        inner = model.model
        self.inner, self.apply_rope = inner, apply_rotary_pos_emb
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.blocks = [
            Block(
                norm1=layer.input_layernorm,
                qkv=self._qkv(layer.self_attn),
                out_proj=layer.self_attn.o_proj,
                norm2=layer.post_attention_layernorm,
                mlp=layer.mlp,
                scaling=layer.self_attn.scaling,
            )
            for layer in inner.layers
        ]
        self.final_norm, self.lm_head = inner.norm, model.lm_head

    @staticmethod
    def _qkv(attn: nn.Module) -> QKV:
        # Read the projections at call time: LoRA injection may replace them after construction.
        return lambda h: (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h))

    def embed(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        x = self.inner.embed_tokens(input_ids)
        return x, self.inner.rotary_emb(x, positions)


class GPT2Decoder(Decoder):
    """GPT-2: LayerNorm, learned positions, one fused Conv1D c_attn for q/k/v, no RoPE."""

    def __init__(self, model: nn.Module) -> None:
        cfg = model.config
        inner = model.transformer
        self.inner = inner
        self.num_heads = self.num_kv_heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.blocks = [
            Block(
                norm1=layer.ln_1,
                qkv=self._qkv(layer.attn, cfg.n_embd),
                out_proj=layer.attn.c_proj,
                norm2=layer.ln_2,
                mlp=layer.mlp,
                scaling=layer.attn.scaling,
            )
            for layer in inner.h
        ]
        self.final_norm, self.lm_head = inner.ln_f, model.lm_head

    @staticmethod
    def _qkv(attn: nn.Module, hidden: int) -> QKV:
        return lambda h: attn.c_attn(h).split(hidden, dim=-1)

    def embed(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        return self.inner.wte(input_ids) + self.inner.wpe(positions), None


DECODERS: dict[str, type[Decoder]] = {"llama": LlamaDecoder, "gpt2": GPT2Decoder}


def decoder_for(model: nn.Module) -> Decoder:
    model_type = model.config.model_type
    if model_type not in DECODERS:
        raise ValueError(f"unsupported decoder {model_type!r}; supported: {sorted(DECODERS)}")
    return DECODERS[model_type](model)


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


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """softmax(q k^T * scale, masked) v. With `bias` (CPU decode, one query per head: the kernel reads
    the whole cache span for a few query rows) two matmuls and a softmax, ~40 % faster than CPU
    `scaled_dot_product_attention` at SmolLM2-135M decode shapes, 16 rows x ~110 positions
    (benchmarks/README.md); everything else goes to `scaled_dot_product_attention`. Every query sees at
    least its own position, so no row of the softmax is all -inf."""
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(bias)
    return torch.matmul(scores.softmax(-1), v)


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
    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        if is_prefill:
            logits = self.prefill(seqs)
        else:
            logits = self.decode(seqs) if self.graphs is None else self.graphs.logits(seqs)
        return sample(logits, [s.params for s in seqs], [s.generator for s in seqs])

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
        return self.lm_head(self.decoder.final_norm(hidden[:, 0])).float()

    def _forward(self, seqs: list[Sequence], ids: Tensor, positions: Tensor, last: Tensor) -> Tensor:
        dev = self.device
        ids, positions = ids.to(dev), positions.to(dev)
        rows = [s.row for s in seqs]
        lo = rows[0]
        if rows != list(range(lo, lo + len(rows))):
            raise RuntimeError(f"batch rows {rows} are not contiguous; the KV cache keeps them dense")
        slot_ids = torch.tensor([s.slot for s in seqs], device=dev)
        if self.slots is None:
            if bool((slot_ids != 0).any()):
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
        return self.lm_head(self.decoder.final_norm(hidden)).float()

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
        # mask[b, t, j]: query t of row b sees cache position j iff j <= its own position (causal, and
        # hides whatever an earlier owner or right padding left beyond the row's length).
        mask = torch.arange(span, device=ids.device).view(1, 1, span) <= positions.unsqueeze(-1)
        mask = mask.unsqueeze(1).repeat(1, 1, G, 1) if G > 1 else mask.unsqueeze(1)  # [B, 1, G*T, span]
        bias = decode_bias(mask, x.dtype) if T == 1 else None
        first = 0 if static else int(positions[:, 0].min())
        uniform_start = not static and bool((positions[:, 0] == first).all())
        for layer, blk in enumerate(d.blocks):
            h = blk.norm1(x)
            q, k, v = blk.qkv(h)
            if layout is not None:
                q, k, v = (t.index_select(0, layout.index) for t in (q, k, v))
            q = q.view(B, T, H, hd).transpose(1, 2)
            k = k.view(B, T, Hkv, hd).transpose(1, 2)
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
            out = attend(qg, k_cache[:, :, :span], v_cache[:, :, :span], mask, bias, blk.scaling)
            out = out.view(B, H, T, hd).transpose(1, 2).reshape(B, T, H * hd)
            if layout is not None:
                out = out.new_zeros(x.shape[0], T, H * hd).index_copy_(0, layout.index, out)
            x = x + blk.out_proj(out)
            x = x + blk.mlp(blk.norm2(x))
        return x if layout is None else x.index_select(0, layout.index)
