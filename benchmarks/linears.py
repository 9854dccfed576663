"""linears suite: the ways to hold SmolLM2-135M's 210 block linears on a CPU, timed one after the other as a
decode step runs them (random weights of the block shapes; no model, no LoRA): fp32 (F.linear and the
oneDNN-packed layout fp32 serves), bf16, dynamic int8 (`quantization=int8`), weight-only int8 and the int4
kernel `quantization=int4`/`auto` use (quantize.py), at 1 and 16 rows, the same run. What it answers: which
kernel each precision setting should use on this CPU, before any accuracy question.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import kernel_flags, machine_info, machine_markdown, set_threads

# SmolLM2-135M: 30 blocks of q, k, v, o (576 -> 576/192/192/576) and gate, up, down (576 <-> 1536)
BLOCK = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def _kernels(weights: list[torch.Tensor]) -> dict:
    """name -> (activation dtype, one callable per linear taking x of that dtype)."""
    from service.engine.packed_linear import PackedLinear
    from service.engine.quantize import Int4Linear, Int8Linear

    def int8_weight_only(w: torch.Tensor, dtype: torch.dtype):
        scale = w.abs().amax(1) / 127
        q = torch.round(w / scale[:, None]).to(torch.int8)
        return lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scale.to(dtype))

    linears = [nn.Linear(w.shape[1], w.shape[0], bias=False) for w in weights]
    for lin, w in zip(linears, weights, strict=True):
        lin.weight.data = w
    bf16 = [w.bfloat16() for w in weights]
    return {
        "fp32_F.linear": (torch.float32, [lambda x, w=w: F.linear(x, w) for w in weights]),
        "fp32_onednn_packed": (torch.float32, [PackedLinear(lin) for lin in linears]),
        "bf16_F.linear": (torch.bfloat16, [lambda x, w=w: F.linear(x, w) for w in bf16]),
        "int8_dynamic": (torch.float32, [Int8Linear(lin) for lin in linears]),
        "int8_weight_only_bf16": (torch.bfloat16, [int8_weight_only(w, torch.bfloat16) for w in weights]),
        "int4_weight_only_bf16": (torch.float32, [Int4Linear(lin) for lin in linears]),  # casts x itself
    }


def run(device: str, quick: bool) -> tuple[dict, str]:
    if device != "cpu":
        raise SystemExit("the linears suite times CPU kernels")
    set_threads(device, quick)
    layers, reps = (2, 2) if quick else (30, 5)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(o, i, generator=g) * 0.02 for _ in range(layers) for o, i in BLOCK]
    cases = []
    kernels = _kernels(weights)
    with torch.inference_mode():
        for rows in (1, 16):
            for name, (dtype, fns) in kernels.items():
                xs = {i: torch.randn(rows, i, generator=g).to(dtype) for i in (576, 1536)}
                inputs = [xs[w.shape[1]] for w in weights]
                times = []
                for _ in range(reps + 1):  # the first pass warms caches and oneDNN's primitives
                    start = time.perf_counter()
                    for fn, x in zip(fns, inputs, strict=True):
                        fn(x)
                    times.append(time.perf_counter() - start)
                cases.append({"case": f"{name}_{rows}rows", "rows": rows, "best_ms": 1e3 * min(times[1:]),
                              "times_s": times[1:]})  # fmt: skip
    result = {"suite": "linears", "quick": quick, "machine": machine_info(device),
              "setup": {"dtype": "float32", "layers": layers, "linears": len(weights), "repetitions": reps},
              "cases": cases}  # fmt: skip
    return result, _markdown(result)


def _markdown(r: dict) -> str:
    best = {c["case"]: c["best_ms"] for c in r["cases"]}
    names = dict.fromkeys(c["case"].rsplit("_", 1)[0] for c in r["cases"])
    lines = [f"# linears suite: SmolLM2's block linears per kernel ({r['machine']['device']}, "
             f"{'quick' if r['quick'] else 'full'})", "", machine_markdown(r["machine"], "per row"),
             f"- CPU flags that choose kernels: {kernel_flags()}",
             f"- {r['setup']['linears']} linears ({r['setup']['layers']} blocks), best of "
             f"{r['setup']['repetitions']} passes", "",
             "| case | 1 row ms | 16 rows ms |", "|---|---:|---:|"]  # fmt: skip
    lines += [f"| {n} | {best[n + '_1rows']:.1f} | {best[n + '_16rows']:.1f} |" for n in names]
    return "\n".join(lines) + "\n"
