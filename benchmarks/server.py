"""server suite: /v1/classify over HTTP (a real `loraswap serve` process, async httpx clients at
concurrency 1/16/64, every request naming one of 32 adapters) next to the engine's raw throughput on
the same texts and adapters, measured in the same run on the same machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine_info, median, percentile

ALL_LINEARS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "validation.jsonl"


def _texts(n: int) -> list[str]:
    rows = [json.loads(line)["text"] for line in DATA.read_text().splitlines()[:n]]
    return rows or ["a fine film"]


def _publish_adapters(registry: Path, n: int, rank: int) -> None:
    """n random (non-zero) r=`rank` adapters on the embedded MiniLM, published like trained ones."""
    from peft import LoraConfig, get_peft_model

    from adapters.bases import DEFAULT_ENCODER, load_base
    from adapters.fingerprint import describe_base
    from adapters.format import import_peft_folder
    from adapters.registry import Registry

    base, _ = load_base(DEFAULT_ENCODER, "classification", num_labels=2)
    info = describe_base(base, DEFAULT_ENCODER, "classification")
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank,
                                            target_modules=ALL_LINEARS))
    reg = Registry(registry)
    work = Path(tempfile.mkdtemp())
    for i in range(n):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name or "modules_to_save" in name:
                    p.normal_(0, 0.02)
        folder = work / f"a{i}"
        model.save_pretrained(folder)
        import_peft_folder(folder, f"bench-{i}", DEFAULT_ENCODER, info)
        reg.publish(folder)
    shutil.rmtree(work)


def _engine_throughput(registry: Path, texts: list[str], n_adapters: int, seconds: float) -> float:
    """Sequences/s of the ClassifierEngine itself: batches of 64 texts spread over all adapters."""
    from adapters.bases import DEFAULT_ENCODER, load_base
    from adapters.fingerprint import describe_base
    from adapters.format import read_adapter
    from service.engine.classifier import ClassifierEngine

    model, tokenizer = load_base(DEFAULT_ENCODER, "classification")
    info = describe_base(model, DEFAULT_ENCODER, "classification")
    engine = ClassifierEngine(model, tokenizer, info, num_slots=n_adapters + 1, max_rank=64)
    for i in range(n_adapters):
        engine.load_slot(i + 1, read_adapter(registry / f"bench-{i}" / "1", info))
    batch = [texts[i % len(texts)] for i in range(64)]
    slots = [1 + i % n_adapters for i in range(64)]
    engine.classify(batch, slots)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine.classify(batch, slots)
        done += len(batch)
    return done / (time.perf_counter() - start)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(url: str, texts: list[str], n_adapters: int, concurrency: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        i = worker
        while time.perf_counter() < stop:
            body = {"adapter": f"bench-{i % n_adapters}", "inputs": texts[i % len(texts)]}
            t0 = time.perf_counter()
            resp = await http.post(f"{url}/v1/classify", json=body)
            latencies.append(time.perf_counter() - t0)
            errors += resp.status_code != 200
            i += concurrency

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(w, http) for w in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors,
            "throughput_rps": len(latencies) / elapsed, "p50_ms": median(latencies) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3}


def _serve(registry: Path, n_adapters: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    env = {**os.environ, "LORASWAP_DECODER_BASE": "", "LORASWAP_WATCH_INTERVAL_S": "0",
           "LORASWAP_MAX_GPU_ADAPTERS": str(n_adapters), "LORASWAP_LOG_LEVEL": "warning"}
    cmd = [str(Path(sys.executable).with_name("loraswap")), "serve", "--port", str(port), "--registry", str(registry)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def run(device: str, quick: bool) -> tuple[dict, str]:
    n_adapters, seconds = (8, 3.0) if quick else (32, 20.0)
    texts = _texts(256)
    result = {"suite": "server", "machine": machine_info(device), "adapters": n_adapters, "rank": 16,
              "seconds_per_level": seconds, "texts": "SST-2 validation sentences, one per request"}
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "registry"
        _publish_adapters(registry, n_adapters, rank=16)
        result["engine_seq_per_s"] = _engine_throughput(registry, texts, n_adapters, seconds)
        proc, url = _serve(registry, n_adapters)
        try:
            # Warm every adapter into its slot so the levels measure serving, not loading.
            asyncio.run(_load(url, texts, n_adapters, n_adapters, 1.0))
            levels = [1, 16] if quick else [1, 16, 64]
            result["levels"] = [asyncio.run(_load(url, texts, n_adapters, c, seconds)) for c in levels]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    top = result["levels"][-1]
    result["server_over_engine"] = top["throughput_rps"] / result["engine_seq_per_s"]
    return result, _markdown(result)


def _markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"# server suite ({m['device']}, {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']})",
        "",
        f"/v1/classify over HTTP (real uvicorn process, one text per request, {r['adapters']} adapters r=16 "
        f"on all linears, requests round-robin over them), {r['seconds_per_level']:.0f} s per level. "
        "Engine = ClassifierEngine.classify on batches of 64 of the same texts, same adapters, same run.",
        "",
        "| concurrency | requests | errors | req/s | p50 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in r["levels"]:
        lines.append(f"| {lv['concurrency']} | {lv['requests']} | {lv['errors']} | {lv['throughput_rps']:.1f} | "
                     f"{lv['p50_ms']:.1f} | {lv['p99_ms']:.1f} |")
    lines += ["", f"Engine raw: {r['engine_seq_per_s']:.1f} seq/s. Server at concurrency "
              f"{r['levels'][-1]['concurrency']} / engine = **{r['server_over_engine']:.2f}x** (target >= 0.7x).", ""]
    return "\n".join(lines)
