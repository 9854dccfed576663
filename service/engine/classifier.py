"""ClassifierEngine: one encoder (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, DeBERTa-v2, ModernBERT) with
multi-LoRA linears and per-slot classification heads (heads.py), so rows for different adapters (with
different label counts) share one forward pass. A row may instead ask for its sentence embedding: the last
hidden state through the base's pooling (adapters/pooling.py), in the same forward as classification rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.errors import AdapterValidationError
from adapters.format import AdapterWeights
from adapters.pooling import Pooling
from service.engine import compute
from service.engine.batcher import ClassifyBatcher
from service.engine.heads import SlotHeads, family_of
from service.engine.lora_model import LoraSlots, inject_multi_lora, matches_target
from service.engine.protocol import EngineStats, StepObserver
from service.engine.quantize import prepare_block_linears

if TYPE_CHECKING:
    from service.config import Settings


def _bert_layers(encoder: nn.Module) -> list[nn.Module] | None:
    """The encoder's layers if they are BERT-style (BERT, RoBERTa, ELECTRA, MiniLM...: self-attention
    query/key/value + output, intermediate, output; absolute positions; no cross-attention or chunking),
    which `ClassifierEngine` runs directly; None means "use the model's own forward"."""
    config = getattr(encoder, "config", None)
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if config is None or layers is None or not hasattr(encoder, "embeddings"):
        return None
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return None
    if getattr(config, "is_decoder", False):  # causal or cross-attending layers: not this loop
        return None
    for layer in layers:
        attention = getattr(layer, "attention", None)
        sa = getattr(attention, "self", None)
        parts = [getattr(sa, n, None) for n in ("query", "key", "value", "attention_head_size")]
        parts += [getattr(attention, "output", None), getattr(layer, "intermediate", None),
                  getattr(layer, "output", None)]  # fmt: skip
        if any(p is None for p in parts) or getattr(layer, "chunk_size_feed_forward", 0):
            return None
    return list(layers)


class ClassifierEngine:
    """Base encoder + multi-LoRA slots + per-slot heads. Implements `Engine` (engine/protocol.py); while
    started, its `batcher` mixes requests of any adapters into batches (`submit`).

    One forward at a time (the batcher calls it from a single worker thread); load/clear of a slot
    that no in-flight request uses is safe meanwhile (the router's leases guarantee that).
    """

    tasks = frozenset({"classification", "embedding"})  # embedding rows: pooled hidden states, no head

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        base_info: Any = None,
        *,
        num_slots: int = 33,
        max_rank: int = 64,
        targets: str | Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int = 256,
        max_labels: int = 128,
        pooling: Pooling | None = None,
        quantization: str = "none",
    ) -> None:
        family = family_of(model)  # before anything else: an unsupported model changes nothing
        encoder = getattr(model, "base_model", None)
        if encoder is None or encoder is model:
            raise ValueError(f"{type(model).__name__} has no encoder (base_model) under its head")
        if base_info is None:  # before injection: the fingerprint reads the untouched parameter names
            from adapters.fingerprint import describe_base

            base_info = describe_base(
                model, getattr(model.config, "_name_or_path", "") or "encoder", "classification"
            )
        self.base_info = base_info
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.num_slots, self.max_rank, self.max_length = num_slots, max_rank, max_length
        self.pooling = pooling or Pooling()  # sentence-transformers' default for a plain encoder: mean
        self.heads = SlotHeads(model, family, num_slots, max_labels)
        # A head module inside the encoder (BERT's pooler) runs per slot from `heads`; the encoder then runs
        # without it (BertModel skips a None pooler), so the base's is not computed too.
        prefix = model.base_model_prefix
        for path in family.modules:
            if path.startswith(prefix + "."):
                parent, _, name = path.rpartition(".")
                setattr(model.get_submodule(parent), name, None)
        self.encoder = encoder
        # BERT-style layers (BERT, RoBERTa, XLM-R, ELECTRA) run as a plain loop over their own modules: HF's
        # forward around them (output capture, kwarg deprecation checks, mask building, per-layer wrappers)
        # was ~15 % of a 1-text MiniLM forward on CPU (benchmarks/README.md). Others keep their own forward.
        self.layers = _bert_layers(encoder)
        # Every Linear outside the head gets LoRA slots (`targets` narrows that): the blocks, and ELECTRA's
        # embeddings_project, which PEFT's all-linear targets. Heads take LoRA merged per slot instead.
        # Wrapped on the full model so slot paths are the adapters' own (`bert.encoder.layer.0...`).
        in_head = tuple(p + "." for p in family.modules)
        wrap = [path for path, m in model.named_modules() if isinstance(m, nn.Linear)
                and not (path + ".").startswith(in_head)
                and (targets is None or matches_target(path, targets))]  # fmt: skip
        self.slots: LoraSlots = inject_multi_lora(model, wrap, num_slots, max_rank)
        # Base block linears: int8, int4 or oneDNN-packed fp32 (quantize.prepare_block_linears); after
        # injection, so LoRA wraps keep their paths and their stacks stay in the engine's dtype.
        self.linears = prepare_block_linears(model, quantization)
        # DeBERTa projects its relative position embeddings with the layer's own (LoRA-wrapped) q/k linears
        # once per batch, one row repeated for every row: exact only when all rows share a slot. So such a
        # batch runs once per slot group, and those projections are routed to the group's slot.
        self.per_slot = family.shares_rows(model.config)
        if self.per_slot:
            for module in encoder.modules():
                for name in family.shared_row_methods:
                    if hasattr(module, name):
                        setattr(module, name, self._one_shared_row(getattr(module, name)))
        self.batcher: ClassifyBatcher | None = None

    @property
    def base_labels(self) -> list[str] | None:
        """The base model's own label names (what slot 0 answers with), if its config names them."""
        id2label = getattr(self.model.config, "id2label", None) or {}
        return [id2label[i] for i in sorted(id2label)] if id2label else None

    # Engine -------------------------------------------------------------------------------------
    async def start(self, settings: Settings, on_step: StepObserver | None = None) -> None:
        if self.batcher is None:
            on_batch = None if on_step is None else lambda size, distinct, waits: on_step(size, distinct)
            self.batcher = ClassifyBatcher(
                self, max_batch_size=settings.max_batch_size, max_batch_tokens=settings.max_batch_tokens,
                max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue, on_batch=on_batch,
                max_tenant_tokens=settings.max_tenant_tokens, shared_batch_tokens=settings.shared_batch_tokens)
        await self.batcher.start()

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()

    def stats(self) -> EngineStats:
        b = self.batcher
        return EngineStats(running=b.running if b else 0, waiting=b.queue_depth if b else 0)

    async def submit(self, texts: Sequence[str] | Sequence[Sequence[int]], slot: int, tenant: str | None = None,
                     on_start: Callable[[float], None] | None = None, *, embed: bool = False,
                     background: bool = False) -> list[Tensor]:
        """Logits (or with `embed` pooled embeddings) per text through `slot`, batched with other requests
        (see ClassifyBatcher.submit; `background`: only while nothing else waits)."""
        if self.batcher is None:
            raise RuntimeError("the classifier engine is not started")
        return await self.batcher.submit(texts, slot, tenant, on_start=on_start, embed=embed, background=background)

    def load_slot(self, slot: int, weights: AdapterWeights) -> None:
        """Copy an AdapterWeights (LoRA + modules_to_save head) into `slot`; validated before any write.

        LoRA on a wrapped Linear goes into the slot's LoRA stacks; LoRA on a head Linear (PEFT's `dense` and
        all-linear match BERT's pooler, DeBERTa's and ModernBERT's head dense) is merged into that slot's
        copy of the module, on top of the adapter's saved module if it has one, else the base's. Runs on the
        compute thread (compute.py), like every forward pass."""
        compute.run(self._load_slot, slot, weights)

    def _load_slot(self, slot: int, weights: AdapterWeights) -> None:
        lora = {p: m for p, m in weights.lora.items() if p in self.slots.modules}
        in_head = {p: m for p, m in weights.lora.items() if p not in self.slots.modules}
        for path in in_head:
            if path not in self.heads.linears:
                raise AdapterValidationError(
                    f"adapter targets {path!r}, which is neither a wrapped LoRA module nor a head module"
                    " this engine keeps per slot"
                )
        modules, num_labels = self.heads.prepare(dict(weights.head), in_head)
        labels = list(getattr(weights.manifest, "labels", None) or [])
        if labels and len(labels) != num_labels:
            raise AdapterValidationError(f"manifest has {len(labels)} labels but the head has {num_labels} rows")
        self.slots.load(slot, lora)  # validates LoRA shapes (and the slot number) before writing
        self.heads.install(slot, modules, num_labels)

    def clear_slot(self, slot: int) -> None:
        compute.run(self._clear_slot, slot)

    def _clear_slot(self, slot: int) -> None:
        self.slots.clear(slot)
        self.heads.clear(slot)

    # Inference ----------------------------------------------------------------------------------
    def num_labels(self, slot: int) -> int:
        return self.heads.num_labels[slot]

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids per text, truncated to max_length (default the engine's; no padding: the batcher pads)."""
        return self.tokenizer(list(texts), truncation=True, max_length=max_length or self.max_length)["input_ids"]

    @property
    def embedding_length(self) -> int:
        """Tokens per embedding input: the engine's limit, or the base's sentence-transformers
        `max_seq_length` when lower (so vectors equal SentenceTransformer.encode on long texts too)."""
        return min(self.max_length, self.pooling.max_seq_length or self.max_length)

    @torch.inference_mode()
    def logits(self, input_ids: Tensor, attention_mask: Tensor, slot_ids: Sequence[int] | Tensor) -> Tensor:
        """[B, L_max] logits, row i through slot_ids[i]'s LoRA and head; padded label columns are -inf."""
        hidden, attention_mask, slot_ids = self.hidden(input_ids, attention_mask, slot_ids)
        return self.heads(hidden, attention_mask, slot_ids)

    @torch.inference_mode()
    def hidden(self, input_ids: Tensor, attention_mask: Tensor,
               slot_ids: Sequence[int] | Tensor) -> tuple[Tensor, Tensor, list[int]]:
        """(last hidden state [B, T, h], mask on the engine's device, slot ids as a host list); row i through
        slot_ids[i]'s LoRA."""
        slot_ids = slot_ids.tolist() if isinstance(slot_ids, Tensor) else [int(s) for s in slot_ids]
        padded = not bool(attention_mask.all())  # before the move: no device sync for CPU-built masks
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        if self.per_slot:
            return self._encode_per_slot(input_ids, attention_mask, slot_ids), attention_mask, slot_ids
        with self.slots.use(slot_ids):
            if self.layers is None:
                hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            else:
                hidden = self._encode(input_ids, attention_mask if padded else None)
        return hidden, attention_mask, slot_ids

    def _encode_per_slot(self, input_ids: Tensor, attention_mask: Tensor, slot_ids: list[int]) -> Tensor:
        """The encoder's own forward once per distinct slot, over that slot's rows."""
        hidden = None
        for slot in sorted(set(slot_ids)):
            index = [i for i, s in enumerate(slot_ids) if s == slot]
            rows = torch.tensor(index, device=input_ids.device)
            with self.slots.use([slot] * len(index)):
                ids, mask = input_ids.index_select(0, rows), attention_mask.index_select(0, rows)
                out = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            if hidden is None:
                hidden = out.new_empty((len(slot_ids), *out.shape[1:]))
            hidden[rows] = out
        return hidden

    def _one_shared_row(self, method):
        """`method`, with the wrapped linears routing its one-row inputs to the (single) slot of the rows."""
        state, slots = self.slots.state, self.slots

        def call(*args, **kwargs):
            rows, device = state.slot_list, state.slot_ids.device if state.slot_ids is not None else None
            if rows is None or len(rows) <= 1:
                return method(*args, **kwargs)
            state.set(rows[:1], False, slots.extra_slots, device)  # every row has this slot (_encode_per_slot)
            try:
                return method(*args, **kwargs)
            finally:
                state.set(rows, False, slots.extra_slots, device)

        return call

    def _encode(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """The BERT-style encoder's last hidden state, layer by layer through its own modules (eval mode:
        dropout is off). SDPA masks padded keys with a bool mask; with no padding it gets none."""
        b, t = input_ids.shape
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        x = self.encoder.embeddings(input_ids=input_ids)  # RoBERTa's derives positions from the pad id
        project = getattr(self.encoder, "embeddings_project", None)  # ELECTRA: embedding_size != hidden
        if project is not None:
            x = project(x)
        for layer in self.layers:
            sa = layer.attention.self
            q, k, v = (proj(x).view(b, t, -1, sa.attention_head_size).transpose(1, 2)
                       for proj in (sa.query, sa.key, sa.value))  # fmt: skip
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sa.attention_head_size**-0.5)
            x = layer.attention.output(a.transpose(1, 2).reshape(b, t, -1), x)
            x = layer.output(layer.intermediate(x), x)
        return x

    def run(self, rows: Sequence[Sequence[int]], slot_ids: Sequence[int],
            embed: Sequence[bool] | None = None) -> list[Tensor]:
        """Token-id rows (any lengths) -> per row (CPU): logits trimmed to the row's slot's label count, or,
        where `embed[i]`, the row's pooled sentence embedding; all rows share one encoder forward."""
        pad = self.tokenizer.pad_token_id
        if pad is None:  # RoBERTa's positions count non-pad ids: pad with the model's own pad id
            pad = getattr(self.model.config, "pad_token_id", None) or 0
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # right padding: the CLS token stays at position 0
            input_ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
            attention_mask[i, : len(r)] = 1
        if not embed or not any(embed):
            out = self.logits(input_ids, attention_mask, list(slot_ids)).float().cpu()
            return [out[i, : self.num_labels(s)] for i, s in enumerate(slot_ids)]
        return self._mixed(input_ids, attention_mask, list(slot_ids), list(embed))

    @torch.inference_mode()
    def _mixed(self, input_ids: Tensor, attention_mask: Tensor, slot_ids: list[int], embed: list[bool]) -> list[Tensor]:
        """One forward; heads for the classification rows only, pooling for the embedding rows."""
        hidden, mask, slots = self.hidden(input_ids, attention_mask, slot_ids)
        out: list[Tensor | None] = [None] * len(slot_ids)
        for wanted in (False, True):
            rows = [i for i, e in enumerate(embed) if e == wanted]
            if not rows:
                continue
            index = torch.as_tensor(rows, device=hidden.device)
            h, m = hidden.index_select(0, index), mask.index_select(0, index)
            if wanted:
                values = self.pooling(h, m).float().cpu()
                for k, i in enumerate(rows):
                    out[i] = values[k]
            else:
                values = self.heads(h, m, [slots[i] for i in rows]).float().cpu()
                for k, i in enumerate(rows):
                    out[i] = values[k, : self.num_labels(slot_ids[i])]
        return out

    def classify(self, texts: Sequence[str], slot_ids: Sequence[int]) -> list[Tensor]:
        """Texts -> per-row logits (one slot per text), each trimmed to its slot's label count."""
        if len(texts) != len(slot_ids):
            raise ValueError(f"{len(texts)} texts but {len(slot_ids)} slot ids")
        return self.run(self.tokenize(texts), [int(s) for s in slot_ids])
