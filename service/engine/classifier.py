"""ClassifierEngine: one BERT-family encoder with multi-LoRA linears and stacked per-slot classification
heads, so rows for different adapters (with different label counts) share one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.engine.lora import copy_transposed
from service.engine.lora_model import LoraSlots, inject_multi_lora
from service.engine.packed_linear import pack_block_linears


class StackedHeads(nn.Module):
    """Per-slot pooler (dense + tanh) and classifier: P[S, h, h], H[S, h, L_max] + biases + label counts.

    Slot 0 holds the base model's own pooler and classifier. An adapter that did not train the pooler
    gets the base pooler copied into its slot, so every slot is self-contained and a reload is a full
    replace. Padded label columns are -inf, so a softmax over the padded row is still right.
    """

    def __init__(self, pooler: nn.Linear | None, classifier: nn.Linear, num_slots: int, max_labels: int):
        super().__init__()
        hidden = classifier.in_features
        if classifier.out_features > max_labels:
            raise ValueError(f"base head has {classifier.out_features} labels > max_labels {max_labels}")
        self.max_labels = max_labels
        self.has_pooler = pooler is not None
        dtype, device = classifier.weight.dtype, classifier.weight.device
        self.register_buffer("pool_w", torch.zeros(num_slots, hidden, hidden, dtype=dtype, device=device))
        self.register_buffer("pool_b", torch.zeros(num_slots, hidden, dtype=dtype, device=device))
        self.register_buffer("head_w", torch.zeros(num_slots, hidden, max_labels, dtype=dtype, device=device))
        self.register_buffer("head_b", torch.zeros(num_slots, max_labels, dtype=dtype, device=device))
        self.num_labels = [0] * num_slots
        self.base_pooler = (pooler.weight.detach().clone(), pooler.bias.detach().clone()) if pooler else None
        self.base_head = (classifier.weight.detach().clone(), classifier.bias.detach().clone())
        self.load(0, *self.base_head, pooler=self.base_pooler)

    @torch.no_grad()
    def load(self, slot: int, weight: Tensor, bias: Tensor, pooler: tuple[Tensor, Tensor] | None) -> None:
        """weight [L, hidden], bias [L] in nn.Linear layout; pooler (weight, bias) or None for the base's."""
        labels = weight.shape[0]
        self.head_w[slot].zero_()
        self.head_b[slot].fill_(float("-inf"))
        copy_transposed(self.head_w[slot, :, :labels], weight)
        self.head_b[slot, :labels].copy_(bias)
        if self.has_pooler:
            pw, pb = pooler if pooler is not None else self.base_pooler
            copy_transposed(self.pool_w[slot], pw)
            self.pool_b[slot].copy_(pb)
        self.num_labels[slot] = labels

    def clear(self, slot: int) -> None:
        self.load(slot, *self.base_head, pooler=None)  # a cleared slot behaves like the base model

    def forward(self, hidden_states: Tensor, slot_ids: Tensor) -> Tensor:
        """[B, T, h] encoder output -> [B, L_max] logits, row i through slot_ids[i]'s head (CLS token)."""
        cls = hidden_states[:, 0]
        logits = torch.empty(cls.shape[0], self.max_labels, dtype=cls.dtype, device=cls.device)
        # A loop over the distinct slots in the batch: a few small GEMMs, cheaper than gathering a
        # [B, h, L_max] (and [B, h, h]) weight copy per row.
        for slot in torch.unique(slot_ids).tolist():
            rows = (slot_ids == slot).nonzero().squeeze(1)
            x = cls.index_select(0, rows)
            if self.has_pooler:
                x = torch.tanh(torch.addmm(self.pool_b[slot], x, self.pool_w[slot]))
            logits[rows] = torch.addmm(self.head_b[slot], x, self.head_w[slot])
        return logits


def _head_tensors(
    head: dict[str, Tensor],
) -> tuple[tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor] | None]:
    """(classifier (w, b), pooler (w, b)) from an adapter's modules_to_save tensors, by key suffix."""

    def pair(prefix_suffix: str) -> tuple[Tensor, Tensor] | None:
        w = [v for k, v in head.items() if k.endswith(prefix_suffix + ".weight")]
        b = [v for k, v in head.items() if k.endswith(prefix_suffix + ".bias")]
        if not w:
            return None
        if len(w) > 1 or len(b) != 1:
            raise ValueError(
                f"adapter head has ambiguous or missing {prefix_suffix} weight/bias: {sorted(head)}"
            )
        return w[0], b[0]

    known = ("classifier.weight", "classifier.bias", "pooler.dense.weight", "pooler.dense.bias")
    unknown = [k for k in head if not k.endswith(known)]
    if unknown:
        raise ValueError(f"adapter head has tensors this engine cannot serve: {unknown}")
    return pair("classifier"), pair("pooler.dense")


def _merge(path: str, lm: Any, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """(weight, bias) of a per-slot head Linear with the adapter's LoRA on it merged in, shapes checked."""
    out, fan_in = weight.shape
    if lm.A.dim() != 2 or lm.B.dim() != 2 or tuple(lm.B.shape) != (out, lm.rank) or lm.A.shape[1] != fan_in:
        raise ValueError(
            f"{path}: LoRA A {tuple(lm.A.shape)}, B {tuple(lm.B.shape)} do not fit its [{out}, {fan_in}] weight"
        )
    if any(t is not None and t.shape != (out,) for t in (lm.bias, lm.magnitude)):
        raise ValueError(f"{path}: LoRA bias/magnitude must be [{out}]")
    return lm.merged(weight, bias)


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
    """Base encoder + multi-LoRA slots + stacked heads. Implements SlotEngine (docs/ARCHITECTURE.md).

    One forward at a time (the batcher calls it from a single worker thread); load/clear of a slot
    that no in-flight request uses is safe meanwhile (the adapter manager's leases guarantee that).
    """

    task = "classification"

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
    ) -> None:
        classifier = getattr(model, "classifier", None)
        encoder = getattr(model, "base_model", None)
        if not isinstance(classifier, nn.Linear) or encoder is None or encoder is model:
            raise ValueError(
                "ClassifierEngine needs a BERT-style ...ForSequenceClassification (Linear `classifier`)"
            )
        if base_info is None:  # before injection: the fingerprint reads the untouched parameter names
            from adapters.fingerprint import describe_base

            base_info = describe_base(
                model, getattr(model.config, "_name_or_path", "") or "encoder", self.task
            )
        self.base_info = base_info
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.num_slots, self.max_rank, self.max_length = num_slots, max_rank, max_length
        # The pooler and classifier become per-slot stacks; the encoder then runs without its own pooler
        # (BertModel skips a None pooler) so the base pooler is not computed twice.
        pooler = getattr(getattr(encoder, "pooler", None), "dense", None)
        self.heads = StackedHeads(pooler, classifier, num_slots, max_labels)
        prefix = getattr(model, "base_model_prefix", "") or "bert"
        self.pooler_path = f"{prefix}.pooler.dense"
        if pooler is not None:
            encoder.pooler = None
        self.encoder = encoder
        # BERT-style layers run as a plain loop over their own modules: HF's forward around them (output
        # capture, kwarg deprecation checks, mask building, per-layer wrappers) was ~15 % of a 1-text
        # MiniLM forward on CPU (benchmarks/README.md). Other encoders keep their own forward.
        self.layers = _bert_layers(encoder)
        # Wrapped on the full model so slot paths are the adapters' own (`bert.encoder.layer.0...`).
        self.slots: LoraSlots = inject_multi_lora(model, targets, num_slots, max_rank)
        pack_block_linears(model)  # CPU fp32 only; after injection, so LoRA wraps keep their paths
        self.labels: list[list[str] | None] = [None] * num_slots
        id2label = getattr(model.config, "id2label", None) or {}
        self.labels[0] = [id2label.get(i, f"LABEL_{i}") for i in range(classifier.out_features)]

    # SlotEngine ---------------------------------------------------------------------------------
    def load_slot(self, slot: int, weights: Any) -> None:
        """Copy an AdapterWeights (LoRA + modules_to_save head) into `slot`; validated before any write."""
        lora = {p: m for p, m in weights.lora.items() if p in self.slots.modules}
        folded = {p: m for p, m in weights.lora.items() if p not in self.slots.modules}
        classifier, pooler = _head_tensors(dict(weights.head))
        hidden = self.heads.head_w.shape[1]
        if classifier is None:
            classifier = self.heads.base_head
        # LoRA on a module this engine keeps per slot (PEFT's `dense` and `all-linear` match the pooler) is
        # merged into the slot's copy, on top of the adapter's own saved module if it has one.
        kept = {"classifier": classifier}
        if self.heads.has_pooler:
            kept[self.pooler_path] = pooler if pooler is not None else self.heads.base_pooler
        for path, lm in folded.items():
            if path not in kept:
                raise ValueError(
                    f"adapter targets {path!r}, which is neither a wrapped LoRA module nor a head module"
                    " this engine keeps per slot"
                )
            kept[path] = _merge(path, lm, *kept[path])
        classifier = kept["classifier"]
        if self.pooler_path in folded:
            pooler = kept[self.pooler_path]
        w, b = classifier
        if w.dim() != 2 or w.shape[1] != hidden or b.shape != (w.shape[0],):
            raise ValueError(f"classifier head must be [labels, {hidden}] + [labels], got {tuple(w.shape)}")
        if w.shape[0] > self.heads.max_labels:
            raise ValueError(f"adapter has {w.shape[0]} labels > max_labels {self.heads.max_labels}")
        if pooler is not None and (not self.heads.has_pooler or pooler[0].shape != (hidden, hidden)):
            raise ValueError(f"pooler head must be [{hidden}, {hidden}] on a base with a pooler")
        labels = list(getattr(weights.manifest, "labels", None) or [])
        if labels and len(labels) != w.shape[0]:
            raise ValueError(f"manifest has {len(labels)} labels but the head has {w.shape[0]} rows")
        self.slots.load(slot, lora)  # validates LoRA shapes before writing
        self.heads.load(slot, w, b, pooler)
        self.labels[slot] = labels or [f"LABEL_{i}" for i in range(w.shape[0])]

    def clear_slot(self, slot: int) -> None:
        self.slots.clear(slot)
        self.heads.clear(slot)
        self.labels[slot] = None

    # Inference ----------------------------------------------------------------------------------
    def num_labels(self, slot: int) -> int:
        return self.heads.num_labels[slot]

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, truncated to max_length (no padding: the batcher pads per batch)."""
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]

    @torch.inference_mode()
    def logits(self, input_ids: Tensor, attention_mask: Tensor, slot_ids: Tensor) -> Tensor:
        """[B, L_max] logits, row i through slot_ids[i]'s LoRA and head; padded label columns are -inf."""
        slot_ids = torch.as_tensor(slot_ids, dtype=torch.long, device=self.device)
        padded = not bool(attention_mask.all())  # before the move: no device sync for CPU-built masks
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        with self.slots.use(slot_ids):
            if self.layers is None:
                hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            else:
                hidden = self._encode(input_ids, attention_mask if padded else None)
        return self.heads(hidden, slot_ids)

    def _encode(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """The BERT-style encoder's last hidden state, layer by layer through its own modules (eval mode:
        dropout is off). SDPA masks padded keys with a bool mask; with no padding it gets none."""
        b, t = input_ids.shape
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        x = self.encoder.embeddings(input_ids=input_ids)
        for layer in self.layers:
            sa = layer.attention.self
            q, k, v = (proj(x).view(b, t, -1, sa.attention_head_size).transpose(1, 2)
                       for proj in (sa.query, sa.key, sa.value))  # fmt: skip
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sa.attention_head_size**-0.5)
            x = layer.attention.output(a.transpose(1, 2).reshape(b, t, -1), x)
            x = layer.output(layer.intermediate(x), x)
        return x

    def run(self, rows: Sequence[Sequence[int]], slot_ids: Sequence[int]) -> list[Tensor]:
        """Token-id rows (any lengths) -> per-row logits trimmed to the row's slot's label count (CPU)."""
        pad = self.tokenizer.pad_token_id or 0
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # right padding: the CLS token stays at position 0
            input_ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
            attention_mask[i, : len(r)] = 1
        out = self.logits(input_ids, attention_mask, torch.as_tensor(list(slot_ids))).float().cpu()
        return [out[i, : self.num_labels(s)] for i, s in enumerate(slot_ids)]

    def classify(self, texts: Sequence[str], slot_ids: Sequence[int]) -> list[Tensor]:
        """Texts -> per-row logits (one slot per text), each trimmed to its slot's label count."""
        if len(texts) != len(slot_ids):
            raise ValueError(f"{len(texts)} texts but {len(slot_ids)} slot ids")
        return self.run(self.tokenize(texts), [int(s) for s in slot_ids])
