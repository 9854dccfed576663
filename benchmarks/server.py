"""server suite: /v1/classify end to end over HTTP — a real `loraswap serve` process with the service's
`max_rank` (64), an aiohttp load generator at concurrency 1/16/64, every request naming one of 32 adapters
(8 with --quick) of mixed ranks (16, 8, 4 in turn) round-robin; then concurrency 64 on one rank-16 adapter
(mixed / one adapter: what mixing ranks costs over HTTP) — next to the engine's raw throughput on the same
texts and adapters, measured in the same run.
"""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    log_tail,
    machine_info,
    machine_markdown,
    median,
    percentile,
    set_threads,
    start_server,
    stop_server,
    wait_ready,
)

ALL_LINEARS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "validation.jsonl"
RANKS = (16, 8, 4)  # adapter i has rank RANKS[i % 3]: bench-0, the one-adapter case, the largest


def _texts(n: int) -> list[str]:
    rows = [json.loads(line)["text"] for line in DATA.read_text().splitlines()[:n]]
    return rows or ["a fine film"]


def _publish_adapters(registry: Path, n: int) -> None:
    """n random (non-zero) adapters on the embedded MiniLM, published like trained ones: PEFT saves one per
    rank, each copy gets its own random lora_B and head, then is imported and published."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    from adapters.bases import DEFAULT_ENCODER, load_base
    from adapters.fingerprint import describe_base
    from adapters.format import WEIGHTS_FILE, import_peft_folder
    from adapters.registry import Registry

    base, _ = load_base(DEFAULT_ENCODER, "classification", num_labels=2)
    info = describe_base(base, DEFAULT_ENCODER, "classification")
    reg = Registry(registry)
    work = Path(tempfile.mkdtemp())
    try:
        for r in RANKS:
            model = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r,
                                                                   target_modules=ALL_LINEARS))  # fmt: skip
            model.save_pretrained(work / f"src{r}")
        for i in range(n):
            g, src = torch.Generator().manual_seed(i), work / f"src{RANKS[i % len(RANKS)]}"
            saved = load_file(src / WEIGHTS_FILE)
            folder = work / f"a{i}"
            shutil.copytree(src, folder)
            fresh = {k: torch.randn(t.shape, generator=g) * 0.02 for k, t in saved.items()}
            tensors = {k: fresh[k] if "lora_B" in k or "classifier" in k else t for k, t in saved.items()}
            save_file(tensors, folder / WEIGHTS_FILE)
            import_peft_folder(folder, f"bench-{i}", DEFAULT_ENCODER, info)
            reg.publish(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _engine_throughput(registry: Path, texts: list[str], n_adapters: int, seconds: float, device: str,
                       size: int) -> dict:  # fmt: skip
    """Sequences/s of the ClassifierEngine itself: batches of `size` texts spread over all adapters."""
    from adapters.bases import DEFAULT_ENCODER, load_base
    from adapters.fingerprint import describe_base
    from adapters.format import read_adapter
    from service.engine.classifier import ClassifierEngine

    model, tokenizer = load_base(DEFAULT_ENCODER, "classification")
    info = describe_base(model, DEFAULT_ENCODER, "classification")
    engine = ClassifierEngine(model, tokenizer, info, num_slots=n_adapters + 1, max_rank=64, device=device)
    for i in range(n_adapters):
        engine.load_slot(i + 1, read_adapter(registry / f"bench-{i}" / "1", info))
    batch = [texts[i % len(texts)] for i in range(size)]
    slots = [1 + i % n_adapters for i in range(size)]
    engine.classify(batch, slots)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine.classify(batch, slots)
        done += len(batch)
    return {"case": "engine_raw", "adapters": n_adapters, "batch": size,
            "seq_per_s": done / (time.perf_counter() - start)}  # fmt: skip


async def _load(url: str, texts: list[str], n_adapters: int, concurrency: int, seconds: float,
                case: str | None = None) -> dict:  # fmt: skip
    """`concurrency` clients, each sending one request after the other until `seconds` have passed
    (at least one each: with seconds=0, client w sends one request, to adapter w).

    The clients are aiohttp, not httpx: on the 2-core machine the load generator shares the cores with the
    server, and httpx spent 0.3-0.5 cores at ~45 req/s (aiohttp 0.02), CPU the server then lacked."""
    import aiohttp

    latencies: list[float] = []
    errors = 0

    async def client(worker: int, http: aiohttp.ClientSession, stop: float) -> None:
        nonlocal errors
        i = worker
        while True:
            body = {"adapter": f"bench-{i % n_adapters}", "inputs": texts[i % len(texts)]}
            t0 = time.perf_counter()
            try:
                async with http.post(f"{url}/v1/classify", json=body) as resp:
                    await resp.read()
                    errors += resp.status != 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                errors += 1
            latencies.append(time.perf_counter() - t0)
            i += concurrency
            if time.perf_counter() >= stop:
                return

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(w, http, start + seconds) for w in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"case": case or f"http_concurrency_{concurrency}", "concurrency": concurrency, "requests": len(latencies),
            "errors": errors, "throughput_rps": len(latencies) / elapsed, "p50_ms": median(latencies) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3}  # fmt: skip


def _start(registry: Path, n_adapters: int, device: str, quick: bool, log: Path) -> tuple[subprocess.Popen, str]:
    env = {"LORASWAP_DECODER_BASE": "", "LORASWAP_WATCH_INTERVAL_S": "0", "LORASWAP_MAX_GPU_ADAPTERS": str(n_adapters),
           "LORASWAP_DEVICE": device, "LORASWAP_DTYPE": "float32"}  # fmt: skip
    if quick and device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # as set_threads does for the in-process cases
    return start_server(registry, env, log)


def run(device: str, quick: bool) -> tuple[dict, str]:
    set_threads(device, quick)
    n_adapters, seconds, batch = (8, 1.5, 16) if quick else (32, 20.0, 64)
    levels = [1, 16, 64]
    texts = _texts(256)
    result = {"suite": "server", "quick": quick, "machine": machine_info(device),
              "setup": {"dtype": "float32", "model": "all-MiniLM-L6-v2 (embedded)", "adapters": n_adapters,
                        "ranks": list(RANKS), "max_rank": 64, "targets": ALL_LINEARS, "seconds_per_level": seconds, "levels": levels,
                        "engine_batch": batch,
                        "texts": "SST-2 validation sentences, one per request"}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        registry, log = Path(tmp) / "registry", Path(tmp) / "serve.log"
        registry.mkdir()
        # The server starts while the adapters are published (it loads them on demand); nothing is timed
        # until it is ready, so the engine's own throughput is measured with the server idle.
        proc, url = _start(registry, n_adapters, device, quick, log)
        try:
            _publish_adapters(registry, n_adapters)
            wait_ready(proc, url, log)
            engine = _engine_throughput(registry, texts, n_adapters, seconds, device, batch)
            # One request per adapter first, so the levels measure serving, not loading.
            warm = asyncio.run(_load(url, texts, n_adapters, n_adapters, 0))
            if warm["errors"]:
                raise RuntimeError(f"{warm['errors']} of {n_adapters} warm-up requests failed; {log_tail(log)}")
            cases = [asyncio.run(_load(url, texts, n_adapters, c, seconds)) for c in levels]
            one = asyncio.run(_load(url, texts, 1, levels[-1], seconds, f"http_one_adapter_{levels[-1]}"))
        finally:
            stop_server(proc)
    result["cases"] = [*cases, one, engine]
    result["server_over_engine"] = cases[-1]["throughput_rps"] / engine["seq_per_s"]
    result["mixed_over_one"] = cases[-1]["throughput_rps"] / one["throughput_rps"]
    return result, _markdown(result)


def _markdown(r: dict) -> str:
    s, engine = r["setup"], r["cases"][-1]
    lines = [
        f"# server suite ({r['machine']['device']}, {'quick' if r['quick'] else 'full'})",
        "",
        machine_markdown(r["machine"], s["dtype"]),
        f"- /v1/classify over HTTP (real uvicorn process, one text per request, {s['adapters']} adapters "
        f"of ranks {'/'.join(map(str, s['ranks']))} in turn on all encoder linears, slots of max_rank "
        f"{s['max_rank']}, requests round-robin over them), "
        f"{s['seconds_per_level']:.1f} s per level. Engine = ClassifierEngine.classify on batches of "
        f"{s['engine_batch']} of the same texts, same adapters.",
        "",
        "| case | requests | errors | req/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in r["cases"][:-1]:
        lines.append(f"| {c['case']} | {c['requests']} | {c['errors']} | {c['throughput_rps']:.1f} | "
                     f"{c['p50_ms']:.1f} | {c['p99_ms']:.1f} |")  # fmt: skip
    lines += ["", f"Engine raw: {engine['seq_per_s']:.1f} seq/s. Server at concurrency {s['levels'][-1]} / "
              f"engine = **{r['server_over_engine']:.2f}x** (target >= 0.7x). Mixed ranks over "
              f"{s['adapters']} adapters / one rank-{s['ranks'][0]} adapter at concurrency {s['levels'][-1]} = "
              f"**{r['mixed_over_one']:.2f}x** (target >= 0.85x).", ""]  # fmt: skip
    return "\n".join(lines)
