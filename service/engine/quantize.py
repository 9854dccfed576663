"""int8 base linears for CPU serving: weights stored as int8 (per output channel), activations quantized
per call (dynamic quantization), through torch's own quantized linear (fbgemm/oneDNN, `torch.ops.quantized`).

Measured on the project's AMD EPYC (AVX2; 2 cores shared with other work, load average 6-12, so only
same-run comparisons mean anything; one SmolLM2-135M forward of N one-token rows, 1 thread, best of 4):
N=1 fp32 540 ms, this kernel 424, torch's weight-only `_weight_int8pack_mm` 800; N=16 fp32 1612, this
kernel 1641, weight-only 15269; in another run torchao 0.18's weight-only int8 was 1.1-1.9x and its dynamic
int8 4-6x slower than fp32. Its cost:
activations are quantized per call with one scale over the whole input (fbgemm: 7 bits), so a row's
result depends on its batch mates, and SmolLM2's loss on a probe text went 2.387 -> 3.297 (MLP activation
outliers; weight-only int8 kept 2.378). So `auto` does not choose it (precision.py); it is opt-in.
Only the linears inside the transformer blocks are quantized (the LoRA targets' rule); the LoRA slots,
embeddings, norms and heads keep the engine's dtype, so adapters trained in fp32 serve unchanged.
torch 2.13 warns that its quantized tensors (torch.quantize_per_channel here) are deprecated: when they go,
this file is the one place to move to torchao or a weight-only kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from service.engine.lora import base_features
from service.engine.lora_model import matches_target
from service.engine.packed_linear import plain_cpu_linear


def can_quantize(module: nn.Module) -> bool:
    """A plain fp32 CPU nn.Linear or Conv1D, on a torch with a quantized CPU engine."""
    return plain_cpu_linear(module) and torch.backends.quantized.engine != "none"


class Int8Linear(nn.Module):
    """y ~= x W^T + b with W held as int8 with one fp32 scale per output row, x quantized per call
    (inference only). `bias` stays a float tensor attribute, as MultiLoraLinear's DoRA path reads it.

    `reduce_range`: fbgemm's AVX2 kernel multiplies u8 x s8 pairs into saturating s16 sums, so activations
    use 7 bits there (torch's own default for that engine); oneDNN and VNNI/AMX do not need it."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.in_features, self.out_features = base_features(base)
        weight = base.weight.detach().float()
        if isinstance(base, Conv1D):  # Conv1D keeps [in, out]
            weight = weight.t()
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
        zero = torch.zeros(weight.shape[0], dtype=torch.long)
        qweight = torch.quantize_per_channel(weight.contiguous(), scale.double(), zero, 0, torch.qint8)
        self.bias = None if base.bias is None else base.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack(qweight, self.bias)
        self.reduce_range = torch.backends.quantized.engine in ("fbgemm", "x86")
        self.nbytes = weight.numel() + 4 * weight.shape[0]  # int8 values + one fp32 scale per row

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)

    def dequantized(self) -> Tensor:
        """The fp32 weight [out, in] this layer multiplies by (what a PEFT oracle's base must hold)."""
        weight, _ = torch.ops.quantized.linear_unpack(self.packed)
        return weight.dequantize()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, int8 dynamic"


def quantize_block_linears(model: nn.Module) -> int:
    """Replace every quantizable linear inside the model's transformer blocks (MultiLoraLinear bases
    included) with an Int8Linear, in place. Returns how many were replaced. Heads, poolers and a (possibly
    tied) lm_head stay as they are, like `packed_linear.pack_block_linears`."""
    chosen = [(path, m) for path, m in model.named_modules() if matches_target(path, None) and can_quantize(m)]
    for path, module in chosen:
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, Int8Linear(module))
    return len(chosen)
