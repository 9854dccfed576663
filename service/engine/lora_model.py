"""Walk a Hugging Face model and wrap its target linears in MultiLoraLinear once, at startup.
`LoraSlots` then loads/clears an adapter across all of them and routes each forward's rows to slots.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from adapters.errors import AdapterValidationError
from adapters.peft import LoraModule, is_target
from service.engine.lora import MultiLoraLinear, SlotGroups, SlotState

# A path component that is a number means "inside a repeated block list" (encoder.layer.3,
# model.layers.3, transformer.h.3): the default targets are every linear there, never the heads.
_IN_BLOCK = re.compile(r"(^|\.)\d+(\.|$)")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def matches_target(path: str, targets: str | Sequence[str] | None) -> bool:
    """None: every module inside the repeated blocks (what the engines wrap, so any adapter's block LoRA fits);
    else PEFT's own target rule (adapters/peft.py): a list entry matches a path or its '.'-suffix, a
    string is a full-match regex."""
    if targets is None:
        return bool(_IN_BLOCK.search(path))
    return is_target({"target_modules": targets if isinstance(targets, str) else list(targets)}, path)


class LoraSlots:
    """Slot bookkeeping for one model: which wrapped linears exist and what each slot holds.

    One forward pass at a time per model (`use` sets state shared by all wrapped linears);
    loading into a slot that no running batch uses is safe while another forward runs.
    """

    def __init__(self, modules: dict[str, MultiLoraLinear], state: SlotState, num_slots: int, max_rank: int):
        self.modules = modules
        self.state = state
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.extra_slots: frozenset[int] = frozenset()  # slots whose adapter has DoRA or LoRA bias terms

    @contextmanager
    def use(self, slot_ids: Sequence[int] | Tensor, laid_out: bool = False) -> Iterator[SlotGroups | None]:
        """Route row i of every wrapped input to slot slot_ids[i] for the duration of the block. Give the
        ids as the host has them (a list): they are checked and grouped there and uploaded once.

        With `laid_out`, yields the SlotGroups whose padded layout every wrapped input must then arrive in
        (row i at `groups.index[i]`, `count * width` rows), or None: rows stay as they are."""
        device = next(iter(self.modules.values())).lora_A.device if self.modules else None
        ids = slot_ids.tolist() if isinstance(slot_ids, Tensor) else [int(s) for s in slot_ids]
        if ids and (min(ids) < 0 or max(ids) >= self.num_slots):
            raise ValueError(f"slot ids must be in [0, {self.num_slots}), got {ids}")
        self.state.set(ids, laid_out, self.extra_slots, device=device)
        try:
            yield self.state.groups if self.state.laid_out else None
        finally:
            self.state.set(None)

    @contextmanager
    def use_static(self, slot_ids: Tensor) -> Iterator[None]:
        """`use` for a CUDA graph: `slot_ids` is a buffer on the model's device whose values change between
        replays, so nothing here reads them (no range check: the caller fills it from checked slots)."""
        self.state.set_static(slot_ids)
        try:
            yield
        finally:
            self.state.set(None)

    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot < self.num_slots:
            raise ValueError(
                f"slot must be in [1, {self.num_slots - 1}] (slot 0 is the base model), got {slot}"
            )

    def load(self, slot: int, lora: dict[str, LoraModule]) -> None:
        """Copy an adapter (module path -> LoraModule, PEFT layout) into `slot`.

        Everything is validated before anything is written, so a refused adapter leaves the slot as it
        was. Wrapped modules the adapter does not target are zeroed: a reload replaces the slot fully.
        """
        self._check_slot(slot)
        for path, lm in lora.items():
            module = self.modules.get(path)
            if module is None:
                raise AdapterValidationError(
                    f"adapter targets {path!r}, which is not a wrapped LoRA module of this model"
                )
            A, B, r = lm.A, lm.B, lm.rank
            if A.dim() != 2 or B.dim() != 2 or B.shape[1] != r:
                raise AdapterValidationError(
                    f"{path}: A {tuple(A.shape)} and B {tuple(B.shape)} are not [r, in] and [out, r]"
                )
            if r > self.max_rank:
                raise AdapterValidationError(f"{path}: rank {r} exceeds max_rank {self.max_rank}")
            if A.shape[1] != module.in_features or B.shape[0] != module.out_features:
                raise AdapterValidationError(
                    f"{path}: expected A [r, {module.in_features}] and B [{module.out_features}, r], "
                    f"got {tuple(A.shape)} and {tuple(B.shape)}"
                )
        self.extra_slots = self.extra_slots - {slot}  # not served with extras while it changes
        for path, module in self.modules.items():
            if path in lora:
                module.load_slot(slot, lora[path])  # converted to fp32 on the slot's device
            else:
                module.clear_slot(slot)
        if any(m.bias is not None or m.magnitude is not None for m in lora.values()):
            self.extra_slots = self.extra_slots | {slot}
        self.state.slot_ranks[slot] = max((lm.rank for lm in lora.values()), default=0)  # exact, after the writes
        self._settle()

    def _settle(self) -> None:
        """On a GPU, wait for this thread's slot copies (non-blocking from pinned memory) before the slot is
        handed out: the engine may run on another stream (a failed CUDA graph capture, for one)."""
        first = next(iter(self.modules.values()), None)
        if first is not None and first.lora_A.is_cuda:
            torch.cuda.current_stream(first.lora_A.device).synchronize()

    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        self.extra_slots = self.extra_slots - {slot}
        self.state.slot_ranks[slot] = 0
        for module in self.modules.values():
            module.clear_slot(slot)
        self._settle()


def inject_multi_lora(
    model: nn.Module,
    targets: str | Sequence[str] | None,
    num_slots: int,
    max_rank: int,
    dtype: torch.dtype | None = None,
) -> LoraSlots:
    """Wrap every Linear/Conv1D whose path matches `targets` (None: every linear inside the repeated
    transformer blocks) in a MultiLoraLinear, in place, exactly once. Returns the slots handle.

    `LoraSlots.modules` is keyed by the original module path (`bert.encoder.layer.0.attention.self.query`),
    the same path adapters use; the base weights move to `<path>.base` in the model's state_dict, so take
    fingerprints before injecting.
    """
    if num_slots < 1 or max_rank < 1:
        raise ValueError("num_slots and max_rank must be >= 1")
    if any(isinstance(m, MultiLoraLinear) for m in model.modules()):
        raise ValueError("model already has MultiLoraLinear modules; inject_multi_lora runs once per model")
    chosen = [
        (path, m) for path, m in model.named_modules() if _is_linear(m) and matches_target(path, targets)
    ]
    if not chosen:
        raise ValueError(f"no Linear/Conv1D module of the model matches targets {targets!r}")
    state = SlotState(slot_ranks=[0] * num_slots)
    modules: dict[str, MultiLoraLinear] = {}
    for path, base in chosen:
        wrapped = MultiLoraLinear(base, state, num_slots, max_rank, dtype)
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, wrapped)
        modules[path] = wrapped
    return LoraSlots(modules, state, num_slots, max_rank)
