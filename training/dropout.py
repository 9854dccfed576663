"""Dropout whose CPU masks come from bulk random words instead of `bernoulli_`.

On CPUs where PyTorch does not take its MKL path (the check is for an Intel vendor), `bernoulli_` draws
one Mersenne-Twister number per element, serially: ~10 ns each, which made dropout ~30 % of a MiniLM
LoRA training step on the project's AMD CPU. Here one 64-bit draw gives four 16-bit uniforms, and an
element is kept when its uniform is at or above p * 2**16: the same Bernoulli(1 - p) mask and
1 / (1 - p) scaling as `nn.Dropout` (p rounded to a multiple of 2**-16), from the same torch generator,
so seeds and the Trainer's RNG checkpoints work unchanged. Other devices call `F.dropout` as before.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_WORDS_PER_DRAW = 4  # int16 uniforms per int64 draw


def bulk_bernoulli_keep(shape: torch.Size, p: float) -> torch.Tensor:
    """A bool CPU tensor, each element True with probability 1 - p (p rounded to a multiple of 2**-16)."""
    n = math.prod(shape)
    draws = torch.empty(math.ceil(n / _WORDS_PER_DRAW), dtype=torch.int64)
    draws.random_(-(2**63), None)  # the full 64-bit range, from torch's default generator
    uniforms = draws.view(torch.int16)[:n].view(shape)
    return uniforms >= -(2**15) + round(p * 2**16)


class BulkDropout(nn.Dropout):
    """`nn.Dropout` with the bulk mask on CPU (see the module docstring); identical elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.p >= 1.0:
            return F.dropout(x, self.p, True, self.inplace)
        keep = bulk_bernoulli_keep(x.shape, self.p)
        # where() saves only the bool mask for backward; scaling first keeps it to one pass over x.
        return torch.where(keep, x * (1.0 / (1.0 - self.p)), 0.0)


def use_bulk_dropout(model: nn.Module) -> int:
    """Swap every `nn.Dropout` in `model` (the base's and PEFT's `lora_dropout`) for `BulkDropout`."""
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Dropout]
    for parent, name, child in found:
        setattr(parent, name, BulkDropout(child.p, child.inplace).train(child.training))
    return len(found)
