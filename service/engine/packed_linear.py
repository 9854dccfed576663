"""CPU fp32 linears with their weight reordered once into oneDNN's blocked layout.

Why: at serving shapes (a few to a few dozen rows against weights that do not fit in cache) the default
CPU path, MKL's GEMM via F.linear, streams the weight at 2-3 GB/s on the project's AMD machine; oneDNN's
matmul on a pre-reordered weight reaches ~7 GB/s. A SmolLM2-135M decode step (16 rows) spends most of its
time in these linears, a MiniLM forward of one short text almost all of it (benchmarks/README.md).
The reorder happens once at engine start; the dense weight is dropped, so memory does not grow.
Everything else (GPU, other dtypes, a torch without the oneDNN ops) keeps the module as it is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from service.engine.lora import base_features
from service.engine.lora_model import matches_target


def plain_cpu_linear(module: nn.Module) -> bool:
    """A plain (not yet wrapped or replaced) fp32 CPU nn.Linear or Conv1D: what the CPU fast paths take."""
    weight = getattr(module, "weight", None)
    return (
        type(module) in (nn.Linear, Conv1D)
        and isinstance(weight, Tensor)
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
    )


def can_pack(module: nn.Module) -> bool:
    """A plain fp32 CPU nn.Linear or Conv1D, on a torch whose oneDNN has the linear ops."""
    return (
        plain_cpu_linear(module)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """y = x W^T + b with W held only in oneDNN's layout (inference only: no autograd through it).

    The packed weight is a plain attribute, not a parameter or buffer: it cannot move devices or be
    saved, and nothing should try; engines pack after every `.to()` and never save their models.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.in_features, self.out_features = base_features(base)
        weight = base.weight.detach()
        if isinstance(base, Conv1D):  # Conv1D keeps [in, out]
            weight = weight.t().contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.bias = None if base.bias is None else base.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, oneDNN"


def pack_block_linears(model: nn.Module) -> int:
    """Replace every packable linear inside the model's transformer blocks (MultiLoraLinear bases
    included) with a PackedLinear, in place. Returns how many were replaced; 0 off CPU fp32. "Inside the
    blocks" is the default LoRA targets' rule: heads, poolers and a (possibly tied) lm_head stay as they are."""
    chosen = [(path, m) for path, m in model.named_modules() if matches_target(path, None) and can_pack(m)]
    for path, module in chosen:
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, PackedLinear(module))
    return len(chosen)
