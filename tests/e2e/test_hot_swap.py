"""Hot swap against a real `loraswap serve`: 32 clients for 20 s while one adapter is re-published every
second (each version permutes its head rows, so every version answers differently and has its own label
names). Zero failed requests, and every answer equals what the version it reports gives (oracle: the
published weights through a reference engine holding that one adapter). Then unload with requests in flight.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import time
from pathlib import Path

import httpx
import torch
from factories import tiny_bert_base
from live import live_server
from safetensors.torch import save_file

from adapters.bases import load_base
from adapters.fingerprint import describe_base
from adapters.format import read_adapter, write_manifest
from adapters.registry import Registry

TEXTS = ["great movie", "dull boring w1 w2", "w5 w6 w7", "loved w9"]
PERMS = [[0, 1, 2, 3], [1, 0, 3, 2], [2, 3, 0, 1], [3, 2, 1, 0], [1, 2, 3, 0], [3, 0, 1, 2]]
CLIENTS, SECONDS = 32, 20.0


def write_adapter(folder: Path, info, name: str, version: int, *, seed: int, perm=(0, 1, 2, 3), r: int = 2) -> Path:
    """Same LoRA weights for a seed; the head's rows permuted by `perm`; labels named after the version."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, (fan_in, fan_out) in info.modules.items():
        if path.rsplit(".", 1)[-1] in ("query", "value"):
            tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(r, fan_in, generator=g) * 0.5
            tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) * 0.5
    hidden, n = info.modules["classifier"][0], len(perm)
    w, b = torch.randn(n, hidden, generator=g), torch.randn(n, generator=g)
    tensors["base_model.model.classifier.weight"] = w[list(perm)].contiguous()
    tensors["base_model.model.classifier.bias"] = b[list(perm)].contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "SEQ_CLS", "r": r, "lora_alpha": 2 * r, "target_modules": ["query", "value"],
        "modules_to_save": ["classifier"], "bias": "none"}))
    write_manifest(folder, name=name, version=version, task="classification",
                   base_model={"name": info.name, "fingerprint": info.fingerprint},
                   labels=[f"{name}-v{version}-{i}" for i in range(n)],
                   head={"classifier.weight": {"shape": [n, hidden], "dtype": "float32"},
                         "classifier.bias": {"shape": [n], "dtype": "float32"}},
                   lora={"r": r, "alpha": 2 * r, "targets": ["query", "value"]},
                   created_at=dt.datetime.now(dt.timezone.utc))
    return folder


def test_hot_swap_under_load_then_unload_in_flight(tmp_path):
    base_dir = tiny_bert_base(tmp_path / "base")
    model, _ = load_base(base_dir, "classification")
    info = describe_base(model, str(base_dir), "classification")
    registry = Registry(tmp_path / "registry")
    registry.publish(write_adapter(tmp_path / "src" / "hot-1", info, "hot", 1, seed=1), name="hot")
    registry.publish(write_adapter(tmp_path / "src" / "other-1", info, "other", 1, seed=2), name="other")

    env = {"LORASWAP_ENCODER_BASE": str(base_dir), "LORASWAP_DECODER_BASE": "",
           "LORASWAP_WATCH_INTERVAL_S": "0.2", "LORASWAP_MAX_GPU_ADAPTERS": "8"}
    answers: list[tuple[str, int, int, dict]] = []  # (adapter, version, text index, scores)
    failures: list[str] = []
    published = [1]

    with live_server(tmp_path / "registry", env=env) as url:
        stop = threading.Event()

        def publisher():
            v = 1
            while not stop.wait(1.0):
                v += 1
                folder = write_adapter(tmp_path / "src" / f"hot-{v}", info, "hot", v, seed=1,
                                       perm=PERMS[(v - 1) % len(PERMS)])
                registry.publish(folder, name="hot", version=v)
                published.append(v)

        async def client(c: int, http: httpx.AsyncClient, deadline: float):
            i = c
            while time.monotonic() < deadline:
                i += 1
                adapter, t = ("other" if i % 5 == 0 else "hot"), i % len(TEXTS)
                try:
                    resp = await http.post(f"{url}/v1/classify", json={"adapter": adapter, "inputs": [TEXTS[t]]})
                except httpx.HTTPError as exc:
                    failures.append(f"{adapter}: {exc!r}")
                    continue
                if resp.status_code != 200:
                    failures.append(f"{adapter}: {resp.status_code} {resp.text[:200]}")
                    continue
                body = resp.json()
                answers.append((body["adapter"], body["version"], t, body["results"][0]["scores"]))

        async def load_phase():
            limits = httpx.Limits(max_connections=CLIENTS)
            async with httpx.AsyncClient(timeout=30, limits=limits) as http:
                deadline = time.monotonic() + SECONDS
                await asyncio.gather(*(client(c, http, deadline) for c in range(CLIENTS)))
                listing = (await http.get(f"{url}/v1/adapters")).json()["data"]
                return {row["name"]: row for row in listing}

        thread = threading.Thread(target=publisher, daemon=True)
        thread.start()
        try:
            listing = asyncio.run(load_phase())
        finally:
            stop.set()
            thread.join()

        # Unload with requests in flight: those already admitted finish (200), new ones get 404, no 5xx.
        async def unload_phase():
            async with httpx.AsyncClient(timeout=30) as http:
                inflight = [asyncio.create_task(http.post(f"{url}/v1/classify",
                                                          json={"adapter": "other", "inputs": TEXTS * 4}))
                            for _ in range(16)]
                await asyncio.sleep(0.02)
                deleted = await http.delete(f"{url}/v1/adapters/other")
                after = await http.post(f"{url}/v1/classify", json={"adapter": "other", "inputs": TEXTS})
                statuses = [(await r).status_code for r in inflight]
                return deleted.status_code, after.status_code, statuses

        deleted, after, statuses = asyncio.run(unload_phase())

    assert failures == [], failures[:5]
    assert len(answers) > 500, len(answers)
    served_versions = {v for a, v, _, _ in answers if a == "hot"}
    assert len(published) >= 15 and len(served_versions) >= 10, (published, sorted(served_versions))
    assert listing["hot"]["version"] >= published[-1] - 1  # followed the registry within ~a poll
    for key in ("version", "tier", "size_bytes", "last_used", "load_ms", "requests"):
        assert listing["hot"][key] is not None, (key, listing["hot"])

    # Oracle per (adapter, version): the published files, one adapter alone in a reference engine.
    from service.engine.classifier import ClassifierEngine

    ref_model, tokenizer = load_base(base_dir, "classification")
    ref = ClassifierEngine(ref_model, tokenizer, info, num_slots=2, max_rank=8)
    wrong = 0
    for adapter, version in sorted({(a, v) for a, v, _, _ in answers}):
        weights = read_adapter(registry.fetch(adapter, version), info, max_rank=8)
        ref.load_slot(1, weights)
        probs = [torch.softmax(x, -1) for x in ref.classify(TEXTS, [1] * len(TEXTS))]
        for a, v, t, scores in answers:
            if (a, v) != (adapter, version):
                continue
            expect = dict(zip(weights.manifest.labels, probs[t].tolist(), strict=True))
            if scores.keys() != expect.keys() or any(abs(scores[k] - expect[k]) > 1e-4 for k in expect):
                wrong += 1
    assert wrong == 0, f"{wrong} of {len(answers)} answers disagree with the version they report"
    print(f"hot swap: {len(answers)} answers in {SECONDS:.0f} s ({len(answers) / SECONDS:.0f} req/s), "
          f"{len(published)} versions published, {len(served_versions)} served, 0 wrong, 0 failed")

    assert deleted == 200 and after == 404, (deleted, after)
    assert set(statuses) <= {200, 404} and 200 in statuses, statuses
