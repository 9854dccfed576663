"""load suite: hot-loading an adapter until it serves, ours next to PEFT, with 1 and 100 adapters resident.

A real MiniLM-L6 adapter (PEFT, r=16 on every encoder linear + a 4-label classifier head; another encoder
with LORASWAP_BENCH_ENCODER, see common.encoder_base), saved once and
copied under many names. Measured in one run:
- ours `load_to_first_answer`: POST /v1/adapters {path} -> the first /v1/classify it serves (the app in
  process over httpx's ASGI transport: no sockets, so this is server time, not network time), and the POST
  alone (`load_response`: full validation + slot copy);
- PEFT `load_adapter` of the same files alone, and `load_adapter` + `set_adapter` + the first forward;
- each with 1 and with 100 adapters already loaded (1 and 10 with --quick);
- where our load time goes: read_adapter (validation) split into its steps, and the copy of already
  validated weights from the host tier into a slot (what reloading an evicted adapter costs);
- churn: many tiny adapters, 32 slots (16 with --quick), 32 clients cycling over all of them (throughput,
  hit rate, evictions, RSS).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    encoder_base,
    lora_bytes,
    machine_info,
    machine_markdown,
    percentile,
    randomize_lora_b,
    set_threads,
    stream_reader,
    time_interleaved,
    weight_bytes,
)

# every linear of the encoder blocks (PEFT "all-linear" would add the pooler, which the engine does not wrap)
ALL_LINEARS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
TEXT = "a great movie"


def _row(case: str, seconds: list[float], **extra) -> dict:
    return {"case": case, "p50_ms": 1e3 * percentile(seconds, 50), "p90_ms": 1e3 * percentile(seconds, 90),
            "n": len(seconds), **extra}  # fmt: skip


def _adapters(work: Path, count: int):
    """One PEFT adapter on the suite's encoder (common.encoder_base) saved once, copied to `count` names,
    each with its own manifest."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from adapters.bases import load_base
    from adapters.fingerprint import describe_base
    from adapters.format import import_peft_folder

    base_path, described = encoder_base(work)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=4)
    peft = get_peft_model(
        model, LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, target_modules=ALL_LINEARS)
    )
    randomize_lora_b(peft)
    src = work / "src"
    peft.save_pretrained(src)
    base, _ = load_base(base_path, "classification")
    info = describe_base(base, base_path, "classification")
    folders = []
    for i in range(count):
        folder = work / f"a{i:03d}"
        shutil.copytree(src, folder)
        import_peft_folder(folder, f"a{i:03d}", base_path, info)
        folders.append(folder)
    return base_path, described, info, folders


def _read_parts(folder: Path, info) -> dict[str, float]:
    """Where read_adapter's time goes (its steps, timed one by one)."""
    from adapters import format as f
    from adapters import peft as p
    from adapters.manifest import Manifest

    t = {}
    s = time.perf_counter()
    f._refuse_pickles(folder)
    manifest = Manifest.load(folder)
    t["manifest"] = time.perf_counter() - s
    s = time.perf_counter()
    f._check_files(folder, manifest, 512 * 2**20)
    config = p.read_config(folder)
    t["file_checks"] = time.perf_counter() - s  # listing, sizes, sha256 of every file but the weights
    s = time.perf_counter()
    tensors = f._load_tensors(folder, manifest.files[f.WEIGHTS_FILE])
    t["weights_read_hash_load"] = time.perf_counter() - s
    s = time.perf_counter()
    lora, head = p.split_tensors(tensors, config, info.modules)
    p.lora_modules(lora, config, info.modules, 64)
    f._check_head(manifest, head, info)
    t["shape_checks"] = time.perf_counter() - s
    return t


def _read_bench(folders, info) -> list[dict]:
    from adapters.format import read_adapter

    full, parts = [], {}
    for folder in folders:
        s = time.perf_counter()
        read_adapter(folder, info, max_rank=16)
        full.append(time.perf_counter() - s)
        for k, v in _read_parts(folder, info).items():
            parts.setdefault(k, []).append(v)
    return [_row("read_adapter", full), *(_row(f"read_part_{k}", v) for k, v in parts.items())]


async def _ours(work: Path, folders, steps, pre: list[Path], base_path: str, info, device: str) -> list[dict]:
    """Our server with the `pre` adapters in slots: POST /v1/adapters for each of `folders`, then its
    first /v1/classify; the load step alone (the adapter manager's load: validated files -> a slot, ready
    to serve, no HTTP) for each of `steps`; then host-tier -> slot copies into a free slot."""
    import httpx

    from adapters.bases import load_base
    from service.app import create_app
    from service.config import Settings
    from service.engine.classifier import ClassifierEngine

    model, tokenizer = load_base(base_path, "classification")
    resident = len(pre)
    slots = resident + len(folders) + len(steps) + 2
    engine = ClassifierEngine(model, tokenizer, info, num_slots=slots, max_rank=16,
                              device=device)  # fmt: skip
    registry = work / f"registry-{resident}"
    registry.mkdir()
    settings = Settings(registry=str(registry), encoder_base=base_path, decoder_base="", watch_interval_s=0,
                        max_gpu_adapters=engine.num_slots - 1)  # fmt: skip
    app = create_app(settings, classifier=engine)
    logging.getLogger("loraswap.access").setLevel(logging.WARNING)  # no access line per request
    first, response, step, copy = [], [], [], []
    async with app.router.lifespan_context(app):
        ctx = app.state.ctx
        router = ctx.routers["classification"]
        for folder in pre:
            await ctx.load(path=str(folder))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            warm = await http.post("/v1/classify", json={"adapter": pre[0].name, "inputs": [TEXT]})
            assert warm.status_code == 200, warm.text  # the first forward pays one-off costs: not timed
            for folder in folders:
                s = time.perf_counter()
                r = await http.post("/v1/adapters", json={"path": str(folder)})
                loaded = time.perf_counter()
                c = await http.post("/v1/classify", json={"adapter": folder.name, "inputs": [TEXT]})
                first.append(time.perf_counter() - s)
                response.append(loaded - s)
                ok = r.status_code == 200 and c.status_code == 200 and c.json()["version"] == 1
                assert ok, (r.text, c.text)
        for folder in steps:
            s = time.perf_counter()
            await ctx.load(path=str(folder))
            if device == "cuda":
                torch.cuda.synchronize()
            step.append(time.perf_counter() - s)
        weights = router.host.get((folders[0].name, 1))  # validated, in host memory
        free = engine.num_slots - 1  # the router fills slots from 1 up and has one more than it needs
        for _ in folders:
            s = time.perf_counter()
            engine.load_slot(free, weights)
            if device == "cuda":
                torch.cuda.synchronize()
            copy.append(time.perf_counter() - s)
        # The first answer's forward alone (one text, the new adapter's slot), next to a plain read of the
        # bytes it must read (weights + that slot's A/B): the floor of any forward on this machine now.
        ids, slot = engine.tokenize([TEXT]), router.pool.get((folders[0].name, 1)).slot
        nbytes = weight_bytes(engine.model) + lora_bytes(engine.model, 1)
        read = stream_reader(nbytes, device)
        floor = time_interleaved({"forward": lambda: engine.run(ids, [slot]), "read": read}, warmup=2,
                                 reps=len(folders), device=device)  # fmt: skip
    return [_row(f"ours_load_to_first_answer_{resident}_resident", first),
            _row(f"ours_load_response_{resident}_resident", response),
            _row(f"ours_load_step_{resident}_resident", step),
            _row(f"ours_slot_copy_from_host_{resident}_resident", copy),
            _row(f"ours_forward_1_text_{resident}_resident", floor["forward"]),
            _row(f"read_forward_bytes_{resident}_resident", floor["read"], mb=nbytes / 2**20)]  # fmt: skip


def _peft(folders, pre: list[Path], base_path: str, device: str) -> list[dict]:
    """PEFT with len(pre) adapters loaded: load_adapter alone, and load + set_adapter + first forward."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    inputs = {k: v.to(device) for k, v in tokenizer([TEXT], return_tensors="pt").items()}
    model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=4).to(device).eval()
    peft = PeftModel.from_pretrained(model, pre[0], adapter_name="p0")
    for i, folder in enumerate(pre[1:]):
        peft.load_adapter(folder, adapter_name=f"p{i + 1}")
    with torch.inference_mode():
        peft(**inputs)  # the first forward pays one-off costs: not timed
    load, first = [], []
    for i, folder in enumerate(folders):
        s = time.perf_counter()
        peft.load_adapter(folder, adapter_name=f"q{i}")
        loaded = time.perf_counter()
        peft.set_adapter(f"q{i}")
        with torch.inference_mode():
            peft(**inputs).logits.cpu()
        first.append(time.perf_counter() - s)
        load.append(loaded - s)
    n = len(pre)
    return [
        _row(f"peft_load_to_first_answer_{n}_resident", first),
        _row(f"peft_load_adapter_{n}_resident", load),
    ]


def _tiny_registry(work: Path, n_adapters: int):
    """n r=1 adapters on a 2-layer BERT, written straight into registry version folders (fast)."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from adapters.fingerprint import describe_base
    from adapters.format import write_manifest
    from adapters.registry import Registry

    torch.manual_seed(0)
    vocab = work / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(50)]]))
    tok = BertTokenizerFast(vocab_file=str(vocab))
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
    ).eval()
    info = describe_base(model, "tiny", "classification")
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "r": 1,
        "lora_alpha": 2,
        "target_modules": ["query", "value"],
        "modules_to_save": ["classifier"],
        "bias": "none",
    }
    head = {"classifier.weight": {"shape": [2, 32], "dtype": "float32"},
            "classifier.bias": {"shape": [2], "dtype": "float32"}}  # fmt: skip
    for i in range(n_adapters):
        name, folder = f"t{i:04d}", work / "registry" / f"t{i:04d}" / "1"
        folder.mkdir(parents=True)
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for path, (fan_in, fan_out) in info.modules.items():
            if path.endswith(("query", "value")):
                tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(1, fan_in, generator=g)
                tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(fan_out, 1, generator=g)
        tensors["base_model.model.classifier.weight"] = torch.randn(2, 32, generator=g)
        tensors["base_model.model.classifier.bias"] = torch.randn(2, generator=g)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(config))
        write_manifest(folder, name=name, version=1, task="classification", labels=["a", "b"], head=head,
                       base_model={"name": "tiny", "fingerprint": info.fingerprint},
                       lora={"r": 1, "alpha": 2, "targets": ["query", "value"]},
                       created_at=dt.datetime.now(dt.timezone.utc))  # fmt: skip
    return model, tok, info, Registry(work / "registry")


def _churn(work: Path, n_adapters: int, slots: int, requests: int, device: str) -> dict:
    """`n_adapters` tiny adapters, `slots` slots, 32 clients whose requests cycle over all of them."""
    from service.engine.batcher import ClassifyBatcher
    from service.engine.classifier import ClassifierEngine
    from service.host_cache import HostCache
    from service.router import AdapterRouter

    s = time.perf_counter()
    model, tok, info, registry = _tiny_registry(work, n_adapters)
    write_s = time.perf_counter() - s
    engine = ClassifierEngine(model, tok, info, num_slots=slots + 1, max_rank=4, device=device)

    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    async def main() -> dict:
        m = AdapterRouter(engine, registry, HostCache(128), base_ids=set())
        batcher = ClassifyBatcher(engine, max_batch_size=32, max_wait_ms=1)
        await batcher.start()
        errors, rss = 0, [rss_mib()]
        counter = iter(range(requests))

        async def client() -> None:
            nonlocal errors
            for i in counter:
                try:
                    async with m.lease(f"t{(i * 37) % n_adapters:04d}") as lease:
                        await batcher.submit(["w1 w2 w3"], lease.slot)
                except Exception:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(32)))
        elapsed = time.perf_counter() - start
        rss.append(rss_mib())
        await batcher.stop()
        return {"case": "churn", "adapters": n_adapters, "slots": slots, "requests": requests,
                "errors": errors, "throughput_rps": requests / elapsed,
                "hit_rate": m.stats["hits"] / requests,
                "evictions": m.pool.evictions, "host_cached": len(m.host), "rss_first_mib": rss[0],
                "rss_last_mib": rss[-1], "write_adapters_s": write_s}  # fmt: skip

    return asyncio.run(main())


def run(device: str, quick: bool) -> tuple[dict, str]:
    set_threads(device, quick)
    machine = machine_info(device)
    reps, most = (3, 10) if quick else (20, 100)
    churn = (64, 16, 256) if quick else (1000, 32, 4000)
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    try:
        base_path, encoder, info, folders = _adapters(work, 2 * reps + most)
        # loaded through HTTP while timed / through the manager while timed / already resident
        measured, steps, pre = folders[:reps], folders[reps : 2 * reps], folders[2 * reps :]
        cases = _read_bench(measured, info)
        for resident in (1, most):
            cases += asyncio.run(_ours(work, measured, steps, pre[:resident], base_path, info, device))
            cases += _peft(measured, pre[:resident], base_path, device)
        cases.append(_churn(work, *churn, device))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"suite": "load", "quick": quick, "machine": machine,
              "setup": {"dtype": "float32", "encoder": encoder,
                        "adapter": "PEFT LoRA r=16 on every encoder linear + classifier head (4 labels)", "reps": reps, "resident": [1, most],
                        "churn": dict(zip(("adapters", "slots", "requests"), churn, strict=True))},
              "cases": cases}  # fmt: skip
    return result, _markdown(result)


def _markdown(r: dict) -> str:
    s, cases = r["setup"], {c["case"]: c for c in r["cases"]}
    lines = [f"# load suite ({r['machine']['device']}, {'quick' if r['quick'] else 'full'})", "",
             machine_markdown(r["machine"], s["dtype"]),
             f"- encoder: {s['encoder']}; adapter: {s['adapter']}; {s['reps']} loads per case", "",
             "| case | p50 ms | p90 ms | n |", "|---|---|---|---|"]  # fmt: skip
    lines += [
        f"| {c['case']} | {c['p50_ms']:.1f} | {c['p90_ms']:.1f} | {c['n']} |" for c in r["cases"] if "n" in c
    ]
    for n in s["resident"]:
        ours = cases[f"ours_load_to_first_answer_{n}_resident"]["p50_ms"]
        peft = cases[f"peft_load_to_first_answer_{n}_resident"]["p50_ms"]
        step, post = (cases[f"ours_load_{k}_{n}_resident"]["p50_ms"] for k in ("step", "response"))
        peft_load = cases[f"peft_load_adapter_{n}_resident"]["p50_ms"]
        lines += ["", f"Load -> first answer with {n} resident: ours {ours:.1f} ms, PEFT {peft:.1f} ms "
                  f"({peft / ours:.1f}x). Load step vs PEFT load_adapter: {step:.1f} vs {peft_load:.1f} ms "
                  f"({peft_load / step:.1f}x); POST /v1/adapters {post:.1f} ms ({peft_load / post:.1f}x)."]  # fmt: skip
        fwd, read = (cases[f"{k}_{n}_resident"] for k in ("ours_forward_1_text", "read_forward_bytes"))
        lines += ["", f"Of the first answer, the classify's forward alone (one text, same run) took "
                  f"{fwd['p50_ms']:.1f} ms; a plain read of the {read['mb']:.0f} MB it must read "
                  f"(weights + the adapter's A/B), timed alongside, {read['p50_ms']:.1f} ms."]  # fmt: skip
    c = cases["churn"]
    lines += ["", f"Churn: {c['adapters']} tiny adapters (r=1), {c['slots']} slots, {c['requests']} requests "
              f"from 32 clients cycling over all of them: {c['errors']} errors, "
              f"{c['throughput_rps']:.1f} req/s, hit rate {c['hit_rate']:.3f}, {c['evictions']} evictions, "
              f"RSS {c['rss_first_mib']:.0f} -> "
              f"{c['rss_last_mib']:.0f} MiB.", ""]  # fmt: skip
    return "\n".join(lines)
