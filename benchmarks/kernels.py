"""kernels suite: each multi-LoRA path of service/engine/lora_paths.py (torch gathered bmm, torch._grouped_mm,
the Triton kernels) on the issue's GPU shapes, one wrapped linear at a time, next to that linear's base GEMM;
the stacks at the service's r_max 64 and sliced to the batch's real rank 16; q/k/v in one Triton launch;
what LoraPaths picks per shape; on CUDA, the decode linears' Triton path replayed from a CUDA graph.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from benchmarks.common import machine_info, machine_markdown, median, set_threads, time_interleaved
from service.engine.lora import _add_lora_gathered_bmm as torch_path
from service.engine.lora_paths import LoraPaths, available_paths
from service.engine.lora_segments import segment_tokens

# name: rows, tokens per row, adapters, adapter rank, linears as (name, in, out)
SHAPES = {
    "bert_prefill": (64, 128, 32, 16, [("qkv", 768, 768), ("attn_out", 768, 768), ("ffn_in", 768, 3072),
                                       ("ffn_out", 3072, 768)]),
    "gpt2_decode": (32, 1, 32, 16, [("c_attn", 768, 2304), ("attn_c_proj", 768, 768), ("c_fc", 768, 3072),
                                    ("mlp_c_proj", 3072, 768)]),
}  # fmt: skip
QUICK = {
    "bert_prefill": (4, 8, 3, 4, [("qkv", 32, 32), ("ffn_in", 32, 64)]),
    "gpt2_decode": (4, 1, 3, 4, [("c_attn", 32, 96)]),
}
MAX_RANK = 64  # the service's default r_max


def _paths(device: str) -> dict:
    paths = {"bmm": None, **available_paths()}
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":  # Triton needs a GPU or its interpreter
        paths = {k: v for k, v in paths.items() if not k.startswith("triton")}
    return paths


def _linear_cases(name, rows, tokens, adapters, rank, inp, out, dtype, device, paths, errors):
    """Timed calls for one linear: its base GEMM and y += delta through each path at both stack ranks, with
    each path's largest error against the fp32 gathered bmm."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows * tokens, inp, generator=g).to(device, dtype)
    weight = (torch.randn(out, inp, generator=g) / inp**0.5).to(device, dtype)
    A = torch.zeros(adapters + 1, inp, MAX_RANK)
    B = torch.zeros(adapters + 1, MAX_RANK, out)
    A[1:, :, :rank] = torch.randn(adapters, inp, rank, generator=g) / inp**0.5
    B[1:, :rank] = torch.randn(adapters, rank, out, generator=g) * 0.02
    ids = (torch.arange(rows) % adapters + 1).to(device)  # every adapter, rows spread evenly
    seg = segment_tokens(ids, tokens, adapters + 1)
    want = torch.zeros(rows * tokens, out, device=device)
    torch_path(want, x.float(), seg.slots, A.to(device), B.to(device))
    stacks = {R: (A[:, :, :R].to(device, dtype), B[:, :R].to(device, dtype)) for R in (MAX_RANK, rank)}
    cases = {f"{name}.base": lambda: F.linear(x, weight)}
    for path, fn in paths.items():
        for R, (a, b) in stacks.items():
            if path == "triton_per_token" and tokens != 1:
                continue
            y = torch.zeros(rows * tokens, out, device=device, dtype=dtype)
            run = (lambda y=y, a=a, b=b: torch_path(y, x, seg.slots, a, b)) if fn is None else (
                lambda y=y, a=a, b=b, fn=fn: fn(y, x, seg, a, b))  # fmt: skip
            try:
                run()
                errors[f"{name}.{path}.r{R}"] = float((y.float() - want).abs().max() / want.abs().max())
            except Exception as exc:  # noqa: BLE001 - a path this machine lacks: recorded, the others go on
                errors[f"{name}.{path}.r{R}"] = repr(exc)[:300]
                continue
            cases[f"{name}.{path}.r{R}"] = run
    return cases


def _qkv_cases(rows, tokens, adapters, rank, inp, dtype, device, paths):
    """q, k and v sharing x: three single-target launches vs one launch for all three (Triton only)."""
    if "triton_segmented" not in paths:
        return {}
    from service.engine import triton_lora

    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(rows * tokens, inp, generator=g).to(device, dtype)
    As = [(torch.randn(adapters + 1, inp, rank, generator=g) * 0.05).to(device, dtype) for _ in range(3)]
    Bs = [(torch.randn(adapters + 1, rank, inp, generator=g) * 0.02).to(device, dtype) for _ in range(3)]
    ys = [torch.zeros(rows * tokens, inp, device=device, dtype=dtype) for _ in range(3)]
    seg = segment_tokens((torch.arange(rows) % adapters + 1).to(device), tokens, adapters + 1)
    per_token = tokens == 1

    def three() -> None:
        for y, a, b in zip(ys, As, Bs, strict=True):
            triton_lora.add_lora([y], x, [a], [b], seg, per_token)

    return {"bert_prefill.qkv3.triton_three_launches": three,
            "bert_prefill.qkv3.triton_one_launch": lambda: triton_lora.add_lora(ys, x, As, Bs, seg, per_token)}  # fmt: skip


def _graph_replay(cases: dict, device: str) -> dict:
    """The decode linears' Triton calls captured in one CUDA graph: replay time vs the same calls eagerly."""
    calls = [fn for name, fn in cases.items() if ".triton_per_token.r16" in name]
    if device != "cuda" or not calls:
        return {}

    def eager() -> None:
        for fn in calls:
            fn()

    eager()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        eager()
    return {"gpt2_decode.triton_per_token_eager": eager, "gpt2_decode.triton_per_token_graph": graph.replay}


def run(device: str, quick: bool) -> tuple[dict, str]:
    set_threads(device, quick)
    machine = machine_info(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = QUICK if quick else SHAPES
    inner = 1 if quick else 20  # calls per timed repetition: one call is tens of us on a GPU
    warmup, reps = (1, 1) if quick else (2, 7)
    paths = _paths(device)
    rows_out, errors, choices = [], {}, {}
    for shape, (rows, tokens, adapters, rank, linears) in shapes.items():
        cases = {}
        for name, inp, out in linears:
            cases |= _linear_cases(f"{shape}.{name}", rows, tokens, adapters, rank, inp, out, dtype, device,
                                   paths, errors)  # fmt: skip
            chooser = LoraPaths(torch_path, {k: v for k, v in paths.items() if v}, reps=1 if quick else 10)
            x = torch.randn(rows, tokens, inp, device=device, dtype=dtype)
            A = torch.zeros(adapters + 1, inp, MAX_RANK, device=device, dtype=dtype)
            B = torch.zeros(adapters + 1, MAX_RANK, out, device=device, dtype=dtype)
            state = type("State", (), {"slot_ids": (torch.arange(rows) % adapters + 1).to(device)})()
            chooser(torch.zeros(rows, tokens, out, device=device, dtype=dtype), x, state, A, B)
            choices[f"{shape}.{name}"] = next(iter(chooser.choices.values()))
        if shape == "bert_prefill":
            cases |= _qkv_cases(rows, tokens, adapters, rank, linears[0][1], dtype, device, paths)
        cases |= _graph_replay(cases, device)
        timed = {n: (lambda fn=fn: [fn() for _ in range(inner)]) for n, fn in cases.items()}
        times = time_interleaved(timed, warmup=warmup, reps=reps, device=device)
        for name, ts in times.items():
            us = 1e6 * median(ts) / inner
            base = median(times.get(name.split(".")[0] + "." + name.split(".")[1] + ".base", [0])) / inner * 1e6
            row = {"case": name, "us": us, "min_us": 1e6 * min(ts) / inner}
            if base and not name.endswith(".base"):  # base GEMM / (base GEMM + delta): the linear's ratio
                row["ratio_vs_base"] = base / (base + us)
            if isinstance(errors.get(name), float):
                row["max_rel_err"] = errors[name]
            rows_out.append(row)
    result = {
        "suite": "kernels",
        "quick": quick,
        "machine": machine,
        "setup": {"dtype": str(dtype).removeprefix("torch."), "max_rank": MAX_RANK, "inner_calls": inner,
                  "warmup": warmup, "reps": reps, "paths": list(paths),
                  "shapes": {k: {"rows": v[0], "tokens_per_row": v[1], "adapters": v[2], "rank": v[3],
                                 "linears": v[4]} for k, v in shapes.items()}},
        "cases": rows_out,
        "choices": choices,  # what LoraPaths picked per linear shape on this device
        "errors": {k: v for k, v in errors.items() if isinstance(v, str)},  # paths that failed to run
    }  # fmt: skip
    return result, _markdown(result)


def _markdown(result: dict) -> str:
    s = result["setup"]
    lines = [
        f"# kernels benchmark ({'quick' if result['quick'] else 'full'})",
        "",
        machine_markdown(result["machine"], s["dtype"]),
        f"- stacks at r_max {s['max_rank']} (`.r64`) and sliced to the adapters' rank (`.r<rank>`); "
        f"median of {s['reps']} reps of {s['inner_calls']} calls; ratio = base GEMM / (base GEMM + LoRA delta)",
        f"- LoraPaths picked: {', '.join(f'{k} {v}' for k, v in result['choices'].items())}",
        "",
        "| case | us per call | min us | ratio vs base linear | max rel. error |",
        "|---|---|---|---|---|",
    ]
    for r in result["cases"]:
        ratio = f"{r['ratio_vs_base']:.2f}" if "ratio_vs_base" in r else ""
        err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else ""
        lines.append(f"| {r['case']} | {r['us']:.1f} | {r['min_us']:.1f} | {ratio} | {err} |")
    for name, error in result["errors"].items():
        lines.append(f"\n- {name} failed: `{error}`")
    return "\n".join(lines) + "\n"
