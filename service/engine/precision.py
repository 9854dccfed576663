"""Which precision a base is served in: the `dtype` and `quantization` settings, with `auto` chosen by what
was measured, never by the CPU's vendor or flags alone, per task, and logged at start-up by the caller.

Measured (benchmarks/README.md, "single", "linears", "int4"): on an AMD EPYC with AVX2 only bf16 matmuls
ran ~3x slower than fp32, and on one with AVX-512/AVX512-BF16 a served bf16 token was faster than fp32 in
one run of three (results/single-cpu-2026-12-05*); where AMX-BF16 exists bf16 should be faster (the issue's
Intel Xeon numbers), but it is unmeasured there, so bf16 is an opt-in everywhere. int8 (quantize.py) is never chosen by `auto`: it costs accuracy far past the
budget (support-reply's reply loss +80 %, activation outliers in the MLP), and its activations are quantized
per call over the whole batch, so a row's result depends on its batch mates; `quantization=int8` opts in.
int4 (quantize.py): `auto` on a CPU asks for "int4-lossless": int4 for the block linears whose weights
already are 4-bit (the embedded SmolLM2, shipped as Q4_1), fp32 for the rest, so `auto` costs no accuracy,
and only if the int4 kernel measures faster than fp32 at engine start on this CPU (the flags do not say: on
an AVX-512 EPYC it was ~4x faster at one row); `quantization=int4` makes every block linear int4 (lossy on
other bases).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    quantization: str  # "none" | "int8" | "int4" | "int4-lossless" (int4 where the weights already are 4-bit)
    reason: str  # why, for the start-up log

    def __str__(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        quantized = {"int8": " with int8 block linears", "int4": " with int4 block linears",
                     "int4-lossless": " with int4 block linears where lossless"}.get(self.quantization, "")  # fmt: skip
        return f"{name}{quantized} ({self.reason})"


def choose(device: str, task: str, dtype: str = "auto", quantization: str = "auto") -> Precision:
    """The precision one base is served in. An explicit `dtype` with `quantization=auto` means no int8
    (so `dtype=float32` alone restores plain fp32); int8 computes in fp32 and runs on CPU only. `task` is
    there so a base can be chosen for on its own; both tasks choose alike today."""
    if quantization in ("int8", "int4"):
        if device != "cpu":
            raise ValueError(f"quantization={quantization} is served on CPU only (its torch kernels are CPU ones)")
        if dtype not in ("auto", "float32"):
            raise ValueError(f"quantization={quantization} keeps float32 around its linears; dtype={dtype} cannot go with it")
        return Precision(torch.float32, quantization, f"quantization={quantization}")
    if quantization not in ("auto", "none"):
        raise ValueError(f"quantization must be auto, none, int8 or int4, got {quantization!r}")
    if dtype != "auto":
        return Precision(DTYPES[dtype], "none", f"dtype={dtype}")
    if device != "cpu":
        return Precision(torch.bfloat16, "none", f"auto on {device}")
    if quantization == "auto":
        return Precision(torch.float32, "int4-lossless",
                         "auto: int4 only where the weights already are 4-bit and it measures faster")  # fmt: skip
    return Precision(torch.float32, "none", "auto, quantization=none")
