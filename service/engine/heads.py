"""Per-slot classification heads for every served encoder family.

Each family is a small table entry: which modules after the encoder make up its head (kept per slot), which
Linear produces the labels, and the few lines of the Hugging Face model's forward that run after its encoder
(eval mode: dropout is the identity). `SlotHeads` keeps, per slot, the family's head modules as they are
in the base, or as copies carrying the adapter's saved head tensors (modules_to_save) and its LoRA on head
Linears merged in (`LoraModule.merged`); the copies share every tensor the adapter did not change. A batch
runs each distinct slot's head once, over that slot's rows.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.errors import AdapterValidationError

Modules = Mapping[str, nn.Module]


def _mean_or_cls(hidden: Tensor, mask: Tensor, config: Any) -> Tensor:
    """ModernBERT's pooling (ModernBertForSequenceClassification.forward): the first token, or the mean
    over the attention mask."""
    if config.classifier_pooling == "cls":
        return hidden[:, 0]
    return (hidden * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True)


def _modernbert_check(config: Any) -> str | None:
    pooling = getattr(config, "classifier_pooling", None)
    if pooling not in ("cls", "mean"):
        return f"ModernBERT classifier_pooling={pooling!r} (only 'cls' and 'mean' are served)"
    return None


@dataclass(frozen=True)
class Family:
    """How one model family classifies after its encoder."""

    modules: tuple[str, ...]  # head module paths from the model root, kept per slot
    output: str  # path of the Linear that produces the labels (its rows may differ per adapter)
    # (modules, last hidden state [n, T, h], attention mask [n, T], config) -> logits [n, labels]
    head: Callable[[Modules, Tensor, Tensor, Any], Tensor]
    check: Callable[[Any], str | None] = lambda config: None  # what of the config cannot be served exactly
    # Encoder methods whose LoRA-wrapped projections take one row shared by the whole batch (DeBERTa's
    # relative position embeddings), and when the config uses them: such a batch runs per slot group.
    shared_row_methods: tuple[str, ...] = ()
    shares_rows: Callable[[Any], bool] = lambda config: False


# The classifier module itself reads token 0 (RobertaClassificationHead, ElectraClassificationHead with gelu).
_WHOLE_HEAD = Family(("classifier",), "classifier.out_proj", lambda m, h, mask, c: m["classifier"](h))

# By config.model_type. BERT's pooler lives inside BertModel: the engine detaches it from the encoder.
FAMILIES: dict[str, Family] = {
    "bert": Family(("bert.pooler", "classifier"), "classifier",
                   lambda m, h, mask, c: m["classifier"](m["bert.pooler"](h))),
    "roberta": _WHOLE_HEAD,
    "xlm-roberta": _WHOLE_HEAD,
    "electra": _WHOLE_HEAD,
    "distilbert": Family(("pre_classifier", "classifier"), "classifier",
                         lambda m, h, mask, c: m["classifier"](F.relu(m["pre_classifier"](h[:, 0])))),
    "deberta-v2": Family(("pooler", "classifier"), "classifier",
                         lambda m, h, mask, c: m["classifier"](m["pooler"](h)),  # ContextPooler: token 0
                         shared_row_methods=("disentangled_attention_bias",),
                         shares_rows=lambda c: bool(c.relative_attention)),
    "modernbert": Family(("head", "classifier"), "classifier",
                         lambda m, h, mask, c: m["classifier"](m["head"](_mean_or_cls(h, mask, c))),
                         _modernbert_check),
}  # fmt: skip


def family_of(model: nn.Module) -> Family:
    """The model's Family; a clear error for anything else (an unknown type, a missing head module, a config
    option that cannot be served exactly)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(
            f"ClassifierEngine does not serve model type {model_type!r} ({type(model).__name__}); supported:"
            f" {', '.join(sorted(FAMILIES))} (...ForSequenceClassification)"
        )
    # Other heads of a family (multiple choice) can have the same modules but mean something else.
    if not type(model).__name__.endswith("ForSequenceClassification"):
        raise ValueError(f"{type(model).__name__} is not a ...ForSequenceClassification model")
    for path in (*family.modules, family.output):
        try:
            model.get_submodule(path)
        except AttributeError:
            raise ValueError(
                f"{type(model).__name__} has no {path!r}: not a {model_type} sequence classifier"
            ) from None
    if not isinstance(model.get_submodule(family.output), nn.Linear):
        raise ValueError(f"{type(model).__name__}.{family.output} is not an nn.Linear")
    reason = family.check(model.config)
    if reason:
        raise ValueError(f"cannot serve {type(model).__name__} exactly: {reason}")
    return family


def merge_lora(path: str, lm: Any, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) of a per-slot head Linear with the adapter's LoRA merged in (fp32, then the weight's
    dtype), shapes checked first."""
    out, fan_in = weight.shape
    if lm.A.dim() != 2 or lm.B.dim() != 2 or tuple(lm.B.shape) != (out, lm.rank) or lm.A.shape[1] != fan_in:
        raise AdapterValidationError(
            f"{path}: LoRA A {tuple(lm.A.shape)}, B {tuple(lm.B.shape)} do not fit"
            f" its weight [{out}, {fan_in}]"
        )
    if any(t is not None and tuple(t.shape) != (out,) for t in (lm.bias, lm.magnitude)):
        raise AdapterValidationError(f"{path}: LoRA bias/magnitude must be [{out}]")
    return lm.map(lambda t: t.to(weight.device)).merged(weight, bias)


class SlotHeads:
    """The family's head modules per slot. Slot 0 (and every cleared slot) is the base's own modules."""

    def __init__(self, model: nn.Module, family: Family, num_slots: int, max_labels: int):
        self.family, self.config, self.max_labels = family, model.config, max_labels
        self.dtype = model.get_submodule(family.output).weight.dtype
        self.base: dict[str, nn.Module] = {p: model.get_submodule(p) for p in family.modules}
        self.params = {f"{root}.{name}": p.detach() for root, m in self.base.items()
                       for name, p in m.named_parameters()}  # fmt: skip
        self.linears = {f"{root}.{name}".rstrip("."): m for root, mod in self.base.items()
                        for name, m in mod.named_modules() if isinstance(m, nn.Linear)}  # fmt: skip
        labels = self.params[f"{family.output}.weight"].shape[0]
        if labels > max_labels:
            raise ValueError(f"base head has {labels} labels > max_labels {max_labels}")
        self.slots: list[dict[str, nn.Module]] = [self.base] * num_slots
        self.num_labels = [labels] * num_slots

    def prepare(
        self, head: Mapping[str, Tensor], lora: Mapping[str, Any]
    ) -> tuple[dict[str, nn.Module], int]:
        """(the slot's head modules, label count) for an adapter's saved head tensors and LoRA on head
        Linears; everything is checked, nothing is written (the caller installs them with `install`)."""
        unknown = sorted(k for k in head if k not in self.params)
        if unknown:
            raise AdapterValidationError(f"adapter head has tensors this engine cannot serve: {unknown}")
        out_w, out_b = f"{self.family.output}.weight", f"{self.family.output}.bias"
        new: dict[str, Tensor] = {}
        for key, t in head.items():
            base = self.params[key]
            if key in (out_w, out_b):  # the label count may differ; the input width may not
                if t.dim() != base.dim() or (t.dim() == 2 and t.shape[1] != base.shape[1]):
                    raise AdapterValidationError(
                        f"classifier head {key} must be [labels, {base.shape[-1]}] (or [labels]), got"
                        f" {tuple(t.shape)}"
                    )
            elif t.shape != base.shape:
                raise AdapterValidationError(f"head tensor {key} must be {tuple(base.shape)}, got {tuple(t.shape)}")
            new[key] = t.to(device=base.device)  # the engine's dtype only after any LoRA merge
        weight = new.get(out_w, self.params[out_w])
        bias = new.get(out_b, self.params.get(out_b))
        labels = weight.shape[0]
        if bias is not None and tuple(bias.shape) != (labels,):
            raise AdapterValidationError(f"classifier head {out_w} has {labels} rows but its bias is {tuple(bias.shape)}")
        if labels > self.max_labels:
            raise AdapterValidationError(f"adapter has {labels} labels > max_labels {self.max_labels}")
        for path, lm in lora.items():
            if path not in self.linears:
                raise AdapterValidationError(f"adapter targets {path!r}, which is not a head Linear of this model")
            w, b = merge_lora(path, lm, new.get(f"{path}.weight", self.params[f"{path}.weight"]),
                              new.get(f"{path}.bias", self.params.get(f"{path}.bias")))  # fmt: skip
            new[f"{path}.weight"] = w
            if b is not None:
                new[f"{path}.bias"] = b
        return self._copies(new), labels

    def _copies(self, new: dict[str, Tensor]) -> dict[str, nn.Module]:
        """The base modules, with a copy (sharing every unchanged tensor) of each one that `new` changes."""
        modules = dict(self.base)
        for root, module in self.base.items():
            changed = {k[len(root) + 1 :]: t for k, t in new.items() if k.startswith(root + ".")}
            if not changed:
                continue
            # deepcopy reuses what is in its memo: no tensor copies, and no copy of a head's config
            shared = {id(p): p for p in module.parameters()} | {id(self.config): self.config}
            module = copy.deepcopy(module, memo=shared)
            for name, t in changed.items():
                owner_path, _, param = name.rpartition(".")
                owner = module.get_submodule(owner_path)
                setattr(owner, param, nn.Parameter(t.to(self.dtype), requires_grad=False))
                if isinstance(owner, nn.Linear):  # a new label count: keep the repr honest
                    owner.out_features, owner.in_features = owner.weight.shape
            modules[root] = module
        return modules

    def install(self, slot: int, modules: dict[str, nn.Module], labels: int) -> None:
        self.slots[slot], self.num_labels[slot] = modules, labels

    def clear(self, slot: int) -> None:
        self.install(slot, self.base, self.num_labels[0])

    def state(self, slot: int) -> dict[str, Tensor]:
        """Every head tensor `slot` serves, by path (for tests and debugging)."""
        return {f"{root}.{k}": t for root, m in self.slots[slot].items() for k, t in m.state_dict().items()}

    def __call__(self, hidden: Tensor, mask: Tensor, slot_ids: list[int]) -> Tensor:
        """[B, T, h] encoder output -> [B, max_labels] logits, row i through slot_ids[i]'s head; padded label
        columns are -inf, so a softmax over the padded row is still right."""
        logits = hidden.new_full((hidden.shape[0], self.max_labels), float("-inf"))
        slots = sorted(set(slot_ids))  # host ids: no device read-back
        if len(slots) == 1:  # the common case: no gather
            logits[:, : self.num_labels[slots[0]]] = self._run(slots[0], hidden, mask)
            return logits
        # One head call per distinct slot: a few small GEMMs, cheaper than per-row weight gathers.
        for slot in slots:
            rows = torch.tensor([i for i, s in enumerate(slot_ids) if s == slot], device=hidden.device)
            out = self._run(slot, hidden.index_select(0, rows), mask.index_select(0, rows))
            logits[rows, : out.shape[1]] = out
        return logits

    def _run(self, slot: int, hidden: Tensor, mask: Tensor) -> Tensor:
        return self.family.head(self.slots[slot], hidden, mask, self.config)
