"""Multi-LoRA math for one wrapped linear: stacked per-slot A/B tensors, one slot id per batch row.
The model walking and slot loading live in `lora_model.py`; engines set the slot ids per forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from adapters.peft import LoraModule
from service.engine.lora_paths import LoraPaths


@dataclass(frozen=True)
class SlotGroups:
    """Rows laid out by slot for the CPU mixed path: slot `lo + g` owns rows g*width .. g*width+width-1
    of a zero-padded [count * width] layout; `index[i]` is row i's place in it."""

    lo: int
    count: int
    width: int
    index: Tensor


def group_rows(slot_ids: Tensor, distinct: list[int]) -> SlotGroups | None:
    """Group rows by slot when the batch's slots span a dense range (padded layout <= 2x the rows), so each
    adapter's A and B are read in place as one batch entry of a slice of the stacks; None otherwise."""
    lo, count = distinct[0], distinct[-1] - distinct[0] + 1
    counts = torch.bincount(slot_ids - lo, minlength=count)
    width = int(counts.max())
    if count * width > 2 * slot_ids.numel():
        return None
    order = torch.argsort(slot_ids, stable=True)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(slot_ids)
    rank[order] = torch.arange(slot_ids.numel(), device=slot_ids.device) - starts[slot_ids[order] - lo]
    return SlotGroups(lo, count, width, (slot_ids - lo) * width + rank)


@dataclass
class SlotState:
    """Per-forward-pass routing shared by every wrapped linear of one model.

    Computed once per forward (in `LoraSlots.use`) so the ~40 wrapped linears do not each
    re-inspect the slot ids (and sync) on the hot path.
    """

    slot_ids: Tensor | None = None  # LongTensor [rows], on the stacks' device
    slot_list: list[int] | None = None  # the same ids on the host, as the scheduler/batcher gave them
    active: bool = False  # False when every row is slot 0: skip all LoRA work
    uniform_slot: int | None = None  # set when every row uses the same adapter slot (> 0)
    groups: SlotGroups | None = None  # CPU, mixed slots over a dense range: see group_rows
    laid_out: bool = False  # inputs arrive already in `groups`' padded layout (the caller scattered them)
    # The slot of every wrapped input's row, when some row's slot has a DoRA rescale or a LoRA bias
    # (LoraSlots.extra_slots); None otherwise: then those terms are skipped.
    extra_rows: Tensor | None = None
    # Rank of each slot's adapter (0: empty), kept by LoraSlots; None: unknown, every slot is max_rank.
    slot_ranks: list[int] | None = None
    # The largest rank among this forward's slots: the wrapped linears read only that many columns of A
    # and rows of B, so a step's LoRA work follows its adapters, not max_rank. None: all of them.
    rank: int | None = None

    @property
    def rows(self) -> int:
        """x.shape[0] of every wrapped input: one per slot id, or count * width when laid out."""
        if self.laid_out:
            return self.groups.count * self.groups.width
        return 0 if self.slot_ids is None else self.slot_ids.shape[0]

    def set_static(self, slot_ids: Tensor) -> None:
        """Route rows with no host sync and no branch on the ids' values (what CUDA graph capture needs):
        every wrapped linear takes the gathered path, rows of slot 0 included (their A/B are zeros), and
        applies the DoRA/bias terms (zeros for slots without them)."""
        self.slot_ids, self.active, self.uniform_slot = slot_ids, True, None
        self.groups, self.laid_out, self.extra_rows, self.rank = None, False, slot_ids, None

    def set(self, slot_ids: Sequence[int] | Tensor | None, laid_out: bool = False,
            extra_slots: frozenset[int] = frozenset(), device: torch.device | str | None = None) -> None:
        """Route the next forward's rows; with `laid_out`, ask for the padded layout (granted when
        `groups` is set: the caller reads `self.laid_out` and scatters its rows once for every linear).
        `extra_slots`: slots whose adapters have DoRA or LoRA bias terms. The routing metadata (distinct
        slots, groups, largest rank) is built here on the host from the ids as a list, and uploaded to
        `device` once."""
        self.groups, self.laid_out, self.extra_rows, self.rank = None, False, None, None
        if slot_ids is None:
            self.slot_ids, self.slot_list, self.active, self.uniform_slot = None, None, False, None
            return
        if isinstance(slot_ids, Tensor):  # a caller holding a tensor already: read it back once
            device = device or slot_ids.device
            slot_ids = slot_ids.tolist()
        device = torch.device(device or "cpu")
        self.slot_list = [int(s) for s in slot_ids]
        host = torch.tensor(self.slot_list, dtype=torch.long)
        distinct = sorted(set(self.slot_list))
        if self.slot_ranks is not None:
            self.rank = max(self.slot_ranks[s] for s in distinct)
        self.active = any(s != 0 for s in distinct)
        self.uniform_slot = distinct[0] if len(distinct) == 1 and distinct[0] != 0 else None
        if self.active and self.uniform_slot is None and device.type == "cpu":
            self.groups = group_rows(host, distinct)
            self.laid_out = laid_out and self.groups is not None
        self.slot_ids = host.to(device)  # the step's one upload of slot ids
        if not extra_slots.isdisjoint(distinct):  # once here, not in each of the wrapped linears
            g = self.groups
            self.extra_rows = (
                torch.arange(g.lo, g.lo + g.count, device=device).repeat_interleave(g.width)
                if self.laid_out else self.slot_ids
            )  # fmt: skip


def base_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D (weight [in, out])."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.nf
    raise TypeError(f"cannot wrap {type(base).__name__}: only nn.Linear and Conv1D are supported")


def copy_transposed(dst: Tensor, src: Tensor, scale: float | None = None) -> None:
    """dst = src.t() (times `scale`, in fp32), written in place, whatever src's dtype and device. fp32 on CPU
    goes through numpy: torch's copy of a transposed [r, in] view ran at ~1 GB/s here, numpy's transposing
    copy ~3x faster, and the slot copy is on the path from POST /v1/adapters to the first answer
    (benchmarks/README.md). On a GPU the (pinned) host tensor is sent as it is and converted there."""
    src = src.to(dst.device, torch.float32, non_blocking=True)
    if dst.device.type == "cpu" and dst.dtype == torch.float32:
        if scale is None:
            np.copyto(dst.numpy(), src.numpy().T)
        else:  # a float32 product, as torch.mul of a float32 tensor by a Python float
            np.multiply(src.numpy().T, np.float32(scale), out=dst.numpy())
    elif scale is None:
        dst.copy_(src.t())
    else:
        torch.mul(src.t(), scale, out=dst)


def lora_delta_reference(x: Tensor, slot_ids: Tensor, lora_A: Tensor, lora_B: Tensor) -> Tensor:
    """Plain per-row loop; the oracle for the fast paths (slow, obviously right)."""
    rows = [x[i] @ lora_A[s] @ lora_B[s] for i, s in enumerate(slot_ids.tolist())]
    return torch.stack(rows)


def _add_lora_uniform(y: Tensor, x: Tensor, slot: int, lora_A: Tensor, lora_B: Tensor) -> None:
    """Every row uses one adapter: two plain GEMMs on the flattened rows, no gather."""
    x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
    y2.addmm_(x2 @ lora_A[slot], lora_B[slot])


def _add_lora_gathered_bmm(y: Tensor, x: Tensor, slot_ids: Tensor, lora_A: Tensor, lora_B: Tensor) -> None:
    """Mixed adapters: gather each row's A/B, then bmm + in-place baddbmm_ (fastest CPU path measured,
    see benchmarks/README.md). 2-D inputs ([N, in], one slot per row) become N sequences of length 1."""
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    y3 = y if y.dim() == 3 else y.unsqueeze(1)
    xa = torch.bmm(x3, lora_A.index_select(0, slot_ids))
    y3.baddbmm_(xa, lora_B.index_select(0, slot_ids))


def _add_lora_grouped_bmm(y: Tensor, x: Tensor, groups: SlotGroups, lora_A: Tensor, lora_B: Tensor) -> None:
    """Mixed adapters over a dense slot range: x's rows scattered into a zero-padded [slots, width, ...]
    layout, two bmm against the stacks' slice for that range (views: no A/B copy), the result gathered
    back, instead of a per-row copy of A and B; in a SmolLM2-135M decode step (16 rows over 8 adapters)
    this was ~7 % faster per step (benchmarks/README.md)."""
    rows, inp, out = x.shape[0], x.shape[-1], y.shape[-1]
    per_row = x[0].numel() // inp  # tokens per row: T for [B, T, in], 1 for [N, in]
    padded = x.new_zeros(groups.count * groups.width, per_row * inp)
    padded.index_copy_(0, groups.index, x.reshape(rows, -1))
    span = slice(groups.lo, groups.lo + groups.count)
    xa = torch.bmm(padded.view(groups.count, groups.width * per_row, inp), lora_A[span])
    delta = torch.bmm(xa, lora_B[span]).view(groups.count * groups.width, per_row * out)
    y.view(rows, -1).add_(delta.index_select(0, groups.index))


def _add_lora_laid_out(y: Tensor, x: Tensor, groups: SlotGroups, lora_A: Tensor, lora_B: Tensor) -> None:
    """Rows already in the padded layout (the model runner scattered them once per forward): the grouped
    bmm with no copy in or out, two ops per linear instead of six."""
    count, hi = groups.count, groups.lo + groups.count
    xa = torch.bmm(x.view(count, -1, x.shape[-1]), lora_A[groups.lo : hi])
    y.view(count, -1, y.shape[-1]).baddbmm_(xa, lora_B[groups.lo : hi])


def _add_lora_cpu(y: Tensor, x: Tensor, state: SlotState, lora_A: Tensor, lora_B: Tensor) -> None:
    """Grouped bmm copies each row's activations in and out (T x (in + out) values), the gathered bmm
    copies each row's A and B (r_max x (in + out)): group only when rows are shorter than the rank, as in
    decode. At 64-token rows (classification, prefill) grouping was 25-35 % slower (benchmarks/README.md)."""
    if state.laid_out:
        _add_lora_laid_out(y, x, state.groups, lora_A, lora_B)
        return
    tokens = x.shape[1] if x.dim() == 3 else 1
    if state.groups is not None and tokens < lora_A.shape[-1]:
        _add_lora_grouped_bmm(y, x, state.groups, lora_A, lora_B)
    else:
        _add_lora_gathered_bmm(y, x, state.slot_ids, lora_A, lora_B)


# Mixed-batch LoRA kernels by device type; add a device here rather than branching in forward().
MIXED_PATHS: dict[str, Callable[[Tensor, Tensor, SlotState, Tensor, Tensor], None]] = {
    "cpu": _add_lora_cpu,
    "cuda": LoraPaths(_add_lora_gathered_bmm),  # or torch._grouped_mm or Triton: timed per shape (lora_paths.py)
}


class MultiLoraLinear(nn.Module):
    """y = base(x) + (x A[s]) B[s] with s the row's slot; the LoRA scale is folded into B at load time.

    DoRA and LoRA bias (PEFT's `use_dora`, `lora_bias`) add two per-slot vectors: with m = magnitude /
    ||W + sBA||_row, PEFT's output base(x) + (m - 1) * (W x) + m * s * (B A x) becomes
    y = base(x) + dora_g[s] * (base(x) - bias) + (x A[s]) B'[s] + lora_bias[s], with g = m - 1 and m folded
    into B' at load time; the LoRA bias is s * b. Both are zeros for other slots, so rows of any adapter
    share one batch, and the terms are only computed when a row's slot has them.

    The base module is kept as is (shared weights, no copy). lora_A [S, in, r_max], lora_B
    [S, r_max, out], dora_g and lora_bias [S, out] are non-persistent buffers: they follow `.to(device)`
    but stay out of state_dict. Slot 0 is all zeros and means "no adapter".
    """

    def __init__(
        self,
        base: nn.Module,
        state: SlotState,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = base_features(base)
        self.base = base
        self.state = state
        self.num_slots, self.max_rank = num_slots, max_rank
        weight = base.weight
        dtype = dtype or weight.dtype
        self.register_buffer(
            "lora_A",
            torch.zeros(num_slots, self.in_features, max_rank, dtype=dtype, device=weight.device),
            persistent=False,
        )
        self.register_buffer(
            "lora_B",
            torch.zeros(num_slots, max_rank, self.out_features, dtype=dtype, device=weight.device),
            persistent=False,
        )
        for name in ("dora_g", "lora_bias"):
            self.register_buffer(
                name, torch.zeros(num_slots, self.out_features, dtype=dtype, device=weight.device), persistent=False
            )
        # DoRA's norm needs ||W_row||^2; kept here because the base weight may be repacked (packed_linear.py).
        self.base_dtype = weight.dtype
        w = weight.detach().float()
        self.register_buffer("weight_sq", (w.t() if isinstance(base, Conv1D) else w).pow(2).sum(1), persistent=False)

    def _base_without_bias(self, x: Tensor) -> Tensor:
        bias = getattr(self.base, "bias", None)
        y = self.base(x)
        return y if bias is None else y - bias

    @torch.no_grad()
    def load_slot(self, slot: int, module: LoraModule) -> None:
        """Copy one module's adapter (PEFT layout: A [r, in], B [out, r]) into `slot`, zero-padding to r_max.
        Shapes are checked by the caller (`LoraSlots.load`) before any slot is touched."""
        A, B, r = module.A, module.B, module.rank
        copy_transposed(self.lora_A[slot, :, :r], A)
        if module.magnitude is None:
            # Scaled straight into the slot (no temporary); computed in fp32, then cast to the stack dtype.
            copy_transposed(self.lora_B[slot, :r, :], B, module.scale)
            self.dora_g[slot].zero_()
        else:  # W A^T through the base module itself: a packed weight has no dense copy to read
            a = A.to(self.weight_sq.device, self.base_dtype)
            weight_a = self._base_without_bias(a).float().t().cpu()
            m = module.dora_scale(self.weight_sq.cpu(), weight_a)
            copy_transposed(self.lora_B[slot, :r, :], B.float() * (m[:, None] * module.scale))
            self.dora_g[slot].copy_(m - 1)
        if module.bias is None:
            self.lora_bias[slot].zero_()
        else:
            self.lora_bias[slot].copy_(module.bias.float() * module.scale)
        if r < self.max_rank:  # only the padding is zeroed: each byte of the slot is written once
            self.lora_A[slot, :, r:].zero_()
            self.lora_B[slot, r:, :].zero_()
        ranks = self.state.slot_ranks
        if ranks is not None:  # never below what the slot holds; LoraSlots.load then sets the adapter's rank
            ranks[slot] = max(ranks[slot], r)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        for stack in (self.lora_A, self.lora_B, self.dora_g, self.lora_bias):
            stack[slot].zero_()

    def _add_extras(self, y: Tensor, state: SlotState) -> None:
        """y += g[s] * (y - base bias) + lora_bias[s], per row (before the LoRA delta is added)."""
        bias = getattr(self.base, "bias", None)
        if state.uniform_slot is not None:
            g, lb = self.dora_g[state.uniform_slot], self.lora_bias[state.uniform_slot]
        else:
            rows = state.extra_rows
            shape = (rows.shape[0],) + (1,) * (y.dim() - 2) + (y.shape[-1],)
            g = self.dora_g.index_select(0, rows).view(shape)
            lb = self.lora_bias.index_select(0, rows).view(shape)
        y.add_((y if bias is None else y - bias) * g + lb)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        state = self.state
        if not state.active:
            return y
        if state.rows != x.shape[0]:
            raise ValueError(f"slot routing is for {state.rows} rows, the input has {x.shape[0]}")
        if state.extra_rows is not None:
            self._add_extras(y, state)
        A, B = self.lora_A, self.lora_B
        if state.rank is not None and state.rank < self.max_rank:  # slots are zero past their rank: exact
            A, B = A[..., : state.rank], B[:, : state.rank]
        if state.uniform_slot is not None:
            _add_lora_uniform(y, x, state.uniform_slot, A, B)
        else:
            MIXED_PATHS.get(x.device.type, _add_lora_cpu)(y, x, state, A, B)
        return y

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, slots={self.num_slots}, r_max={self.max_rank}"
        )
