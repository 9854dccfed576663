"""A batch's tokens grouped by LoRA slot (Punica's SGMV segments), for the grouped GEMM and Triton paths
(`lora_paths.py`, `triton_lora.py`). Built on the device with no host sync and fixed shapes, so it can be
computed inside a CUDA graph; once per forward pass, shared by every wrapped linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Segments:
    """Token t (rows flattened, `tokens_per_row` each) uses slot `slots[t]`; `order` lists the tokens
    sorted by slot, slot s owning order[bounds[s]:bounds[s + 1]] (empty for slots the batch does not use)."""

    slots: Tensor  # [tokens] int64
    order: Tensor  # [tokens] int64
    bounds: Tensor  # [num_slots + 1] int32; bounds[1:] is torch._grouped_mm's `offs`
    tokens_per_row: int


def segment_tokens(slot_ids: Tensor, tokens_per_row: int, num_slots: int) -> Segments:
    """Segments of rows with slot ids `slot_ids` ([rows], values in [0, num_slots)), each row holding
    `tokens_per_row` tokens."""
    slots = slot_ids.repeat_interleave(tokens_per_row) if tokens_per_row > 1 else slot_ids
    ordered, order = torch.sort(slots, stable=True)
    every_slot = torch.arange(num_slots + 1, device=slots.device, dtype=slots.dtype)
    bounds = torch.searchsorted(ordered, every_slot, out_int32=True)
    return Segments(slots, order, bounds, tokens_per_row)
