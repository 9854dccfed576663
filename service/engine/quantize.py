"""Quantized base linears for CPU serving: int8 (weights per output channel, activations quantized per call)
through torch's own quantized linear, and int4 weight-only (groups of 32, activations in bf16) through torch's
CPU int4 matmul (`_weight_int4pack_mm_for_cpu`). `prepare_block_linears` is what the engines call.

int4: the embedded SmolLM2 ships as a Q4_1 GGUF (blocks of 32 weights on a 4-bit grid with a scale and an
offset each), so its dequantized weights fit the same grid again: quantizing them loses only the bf16
rounding of the scale and offset and of the activations (support-reply's reply loss x1.0000 on 200 test
rows, benchmarks/results/accuracy-cpu-2026-12-05-precisions.md). `auto` takes int4 only for such linears
("lossless": relative error of the re-quantized weight <= 2^-8, bf16's own; SmolLM2's are ~0.002, MiniLM's
~0.08, so MiniLM stays fp32) and only where int4 measures faster at start-up on the CPU it runs on (on the
AVX-512 EPYC: SmolLM2's block linears at one row 6.3 ms vs 24.8 ms fp32 packed, results/linears-*; a served
token 19.5 vs 37.3 ms, results/single-*).

int8 (opt-in): measured on an AMD EPYC with AVX2 only (2 cores shared with other work; one SmolLM2-135M
forward of N one-token rows, 1 thread, best of 4): N=1 fp32 540 ms, this kernel 424, torch's weight-only
`_weight_int8pack_mm` 800; N=16 fp32 1612, this kernel 1641, weight-only 15269; torchao 0.18's weight-only
int8 was 1.1-1.9x and its dynamic int8 4-6x slower than fp32. Its cost: activations are quantized per call
with one scale over the whole input (fbgemm: 7 bits), so a row's result depends on its batch mates, and
support-reply's reply loss goes x1.86 (MLP activation outliers). So `auto` never chooses it.
Only the linears inside the transformer blocks are quantized (the LoRA targets' rule); the LoRA slots,
embeddings, norms and heads keep the engine's dtype, so adapters trained in fp32 serve unchanged.
torch 2.13 warns that its quantized tensors (torch.quantize_per_channel here) are deprecated: when they go,
this file is the one place to move to torchao or a weight-only kernel.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from service.engine.lora import base_features
from service.engine.lora_model import matches_target
from service.engine.packed_linear import PackedLinear, pack_block_linears, plain_cpu_linear


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


INT4_GROUP = 32
LOSSLESS = 2.0**-8  # relative error of a re-quantized weight that bf16 rounding alone would cause


def can_int4(module: nn.Module) -> bool:
    """A plain fp32 CPU linear whose shapes the int4 kernel takes, on a torch that has it."""
    if not (plain_cpu_linear(module) and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")):
        return False
    in_features, out_features = base_features(module)
    return in_features % INT4_GROUP == 0 and out_features % 16 == 0


class Int4Linear(nn.Module):
    """y ~= x W^T + b with W held as 4-bit values in groups of 32 along the input, each group with its own
    scale and offset (w = (q - 8) * scale + zero, q in 0..15, torch's int4 convention), x cast to bf16 for
    the kernel and y returned in fp32 (inference only)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.in_features, self.out_features = base_features(base)
        weight = base.weight.detach().float()
        if isinstance(base, Conv1D):
            weight = weight.t()
        groups = weight.reshape(self.out_features, -1, INT4_GROUP)
        lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(1e-12)
        q = torch.round((groups - lo) / scale).clamp_(0, 15)
        # [in / 32, out, 2] in bf16, as the kernel takes them
        self.scales_and_zeros = torch.cat([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().bfloat16()
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).reshape(self.out_features, self.in_features), 1
        )
        self.bias = None if base.bias is None else base.bias.detach().float()
        sz = self.scales_and_zeros.float().transpose(0, 1)  # what the kernel multiplies by, back in fp32
        dequantized = ((q - 8) * sz[..., :1] + sz[..., 1:]).reshape_as(weight)
        self.error = float((dequantized - weight).norm() / weight.norm().clamp_min(1e-30))
        self.nbytes = weight.numel() // 2 + self.scales_and_zeros.numel() * 2

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).bfloat16(), self.packed, INT4_GROUP, self.scales_and_zeros
        )
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, int4 g{INT4_GROUP}"


def _replace(model: nn.Module, make) -> int:
    """Each linear inside the model's transformer blocks (MultiLoraLinear bases included) for which
    `make(path, module)` returns a module is replaced by it, in place; returns how many were. Heads, poolers
    and a (possibly tied) lm_head stay as they are, like `packed_linear.pack_block_linears`."""
    done = 0
    for path, module in list(model.named_modules()):
        if matches_target(path, None) and (new := make(path, module)) is not None:
            parent_path, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent_path), name, new)
            done += 1
    return done


def quantize_block_linears(model: nn.Module) -> int:
    """Every quantizable block linear as an Int8Linear; how many were replaced."""
    return _replace(model, lambda _, m: Int8Linear(m) if can_quantize(m) else None)


def one_row_ms(modules: list[nn.Module], repeats: int = 5) -> float:
    """Best time of one pass of a row through `modules` (each on its own input), in ms."""
    xs = [torch.randn(1, getattr(m, "in_features", None) or base_features(m)[0]) for m in modules]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first pass warms caches and primitives
            start = time.perf_counter()
            for m, x in zip(modules, xs, strict=True):
                m(x)
            best = min(best, time.perf_counter() - start)
    return 1e3 * best


def prepare_block_linears(model: nn.Module, quantization: str) -> str:
    """The engines' base block linears for `quantization` (precision.py): "int8"; "int4" (every linear the
    kernel takes); "int4-lossless": only those whose weights already are 4-bit, and only if one row through
    all of them measures at least 10 % faster in int4 than in fp32 as served, here, on this CPU (the whole
    set: one block's weights fit in a cache, and a decode step's do not); "none". Whatever is not int4 or
    int8 is oneDNN-packed where that applies. Returns what was done, for the start-up log."""
    if quantization == "int8":
        return f"{quantize_block_linears(model)} block linears int8"
    chosen: dict[str, nn.Module] = {}
    if quantization in ("int4", "int4-lossless"):
        for path, m in model.named_modules():
            if matches_target(path, None) and can_int4(m):
                new = Int4Linear(m)
                if quantization == "int4" or new.error <= LOSSLESS:
                    chosen[path] = new
    if quantization == "int4":  # asked for: no fp32 copy is packed only to be replaced
        _replace(model, lambda path, _: chosen.get(path))
    pack_block_linears(model)
    timing = ""
    if quantization == "int4-lossless" and chosen:
        int4_ms = one_row_ms(list(chosen.values()))
        fp32_ms = one_row_ms([model.get_submodule(p) for p in chosen])  # as fp32 would serve them
        timing = f" (one row through those {len(chosen)}: int4 {int4_ms:.2f} ms, fp32 {fp32_ms:.2f} ms)"
        if int4_ms <= 0.9 * fp32_ms:
            _replace(model, lambda path, _: chosen.get(path))
    blocks = [m for p, m in model.named_modules() if matches_target(p, None)]
    int4, packed = (sum(isinstance(m, kind) for m in blocks) for kind in (Int4Linear, PackedLinear))
    return f"{int4} block linears int4, {packed} fp32 packed{timing}"
