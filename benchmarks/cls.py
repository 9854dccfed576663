"""cls suite: multi-LoRA classification throughput on the embedded MiniLM-L6 — HF base, PEFT (one adapter,
mixed batch, one forward per adapter) and our ClassifierEngine with 0/1/8/32 adapters per batch.
"""

from __future__ import annotations

import torch

from benchmarks.common import (
    encoder_base,
    machine_info,
    machine_markdown,
    median,
    peft_adapter_weights,
    percentile,
    randomize_lora_b,
    set_threads,
    time_interleaved,
)

ALL_LINEARS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _load(path: str, device: str) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the base head is freshly initialised: the same one in every copy
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
    return model.to(device).eval()


def _peft_with_adapters(path: str, device: str, n: int, rank: int):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, target_modules=ALL_LINEARS)
    model = get_peft_model(_load(path, device), cfg, adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", cfg)
    randomize_lora_b(model, ("lora_B", "modules_to_save"))
    return model.eval()


def run(device: str, quick: bool) -> tuple[dict, str]:
    from transformers import AutoTokenizer

    from service.engine.classifier import ClassifierEngine

    set_threads(device, quick)
    machine = machine_info(device)
    # --quick only checks that the suite runs (seconds even on a busy 2-core machine): tiny shapes.
    batch, seq, n_adapters, rank = (8, 16, 4, 8) if quick else (64, 64, 32, 16)
    warmup, reps, lat_reps = (1, 1, 3) if quick else (1, 5, 30)
    peft_warmup, peft_reps = (0, 1) if quick else (0, 2)  # PEFT's mixed batch is slow: fewer reps
    path, described = encoder_base()
    tok = AutoTokenizer.from_pretrained(path)

    base = _load(path, device)
    peft_model = _peft_with_adapters(path, device, n_adapters, rank)
    engine = ClassifierEngine(_load(path, device), tok, object(), num_slots=n_adapters + 1, max_rank=rank,
                              device=device)  # fmt: skip
    for i in range(n_adapters):
        engine.load_slot(i + 1, peft_adapter_weights(peft_model, f"a{i}", 2.0))

    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 30000, (batch, seq), generator=gen)
    input_ids[:, 0], input_ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    input_ids, mask = input_ids.to(device), torch.ones_like(input_ids).to(device)
    names = [f"a{i % n_adapters}" for i in range(batch)]

    def mixed_slots(k: int) -> torch.Tensor:
        return torch.tensor([0 if k == 0 else 1 + i % k for i in range(batch)])

    def peft_per_adapter() -> None:
        for a in sorted(set(names)):
            rows = [i for i, n in enumerate(names) if n == a]
            peft_model.set_adapter(a)
            peft_model(input_ids=input_ids[rows], attention_mask=mask[rows])

    def peft_one(ids: torch.Tensor = input_ids, attention: torch.Tensor = mask) -> None:
        peft_model.set_adapter("a0")
        peft_model(input_ids=ids, attention_mask=attention)

    cases = {"hf_base": lambda: base(input_ids=input_ids, attention_mask=mask)}
    peft_cases = {
        "peft_one_adapter": peft_one,
        "peft_mixed_batch": lambda: peft_model(input_ids=input_ids, attention_mask=mask, adapter_names=names),
        "peft_forward_per_adapter": peft_per_adapter,
    }
    for k in sorted({0, 1, min(8, n_adapters), n_adapters}):
        slots = mixed_slots(k)
        cases[f"ours_{k}_adapters"] = lambda s=slots: engine.logits(input_ids, mask, s)
    with torch.inference_mode():
        times = time_interleaved(cases, warmup=warmup, reps=reps, device=device)
        times.update(time_interleaved(peft_cases, warmup=peft_warmup, reps=peft_reps, device=device))
        one = input_ids[:1]
        lat_cases = {
            "ours_batch1_no_adapter": lambda: engine.logits(one, mask[:1], torch.tensor([0])),
            "ours_batch1_adapter": lambda: engine.logits(one, mask[:1], torch.tensor([1])),
            "hf_base_batch1": lambda: base(input_ids=one, attention_mask=mask[:1]),
            "peft_batch1_adapter": lambda: peft_one(one, mask[:1]),
        }
        lat = time_interleaved(lat_cases, warmup=1 if quick else 3, reps=lat_reps, device=device)

    ref = median(times["ours_0_adapters"])
    rows = []
    for name, ts in times.items():
        t = median(ts)
        rows.append({"case": name, "median_s": t, "min_s": min(ts), "seq_per_s": batch / t,
                     "ratio_vs_ours_no_adapter": ref / t, "times_s": ts})  # fmt: skip
    latency = [{"case": n, "p50_ms": 1e3 * percentile(ts, 50), "p99_ms": 1e3 * percentile(ts, 99),
                "n": len(ts)} for n, ts in lat.items()]  # fmt: skip
    result = {
        "suite": "cls",
        "quick": quick,
        "machine": machine,
        "setup": {"model": described, "dtype": "float32", "batch": batch, "seq_len": seq,
                  "adapters": n_adapters, "rank": rank, "targets": ALL_LINEARS, "warmup": warmup,
                  "reps": reps, "peft_warmup": peft_warmup, "peft_reps": peft_reps, "latency_seq_len": seq,
                  "lora_path": "gathered bmm + baddbmm_ (mixed), plain GEMMs (uniform)"},
        "throughput": rows,
        "latency_batch1": latency,
    }  # fmt: skip
    return result, _markdown(result)


def _markdown(result: dict) -> str:
    m, s = result["machine"], result["setup"]
    lines = [
        f"# cls benchmark ({'quick' if result['quick'] else 'full'})",
        "",
        machine_markdown(m, s["dtype"]),
        f"- model: {s['model']}, {s['dtype']}, batch {s['batch']} x {s['seq_len']} tokens, {s['adapters']}"
        f" adapters r={s['rank']} on {', '.join(s['targets'])}; median of {s['reps']} interleaved reps after"
        f" {s['warmup']} warm-up (PEFT cases: {s['peft_reps']} reps after {s['peft_warmup']})",
        "",
        "| case | median s/batch | seq/s | ratio vs ours, no adapter |",
        "|---|---|---|---|",
    ]
    for r in result["throughput"]:
        ratio = r["ratio_vs_ours_no_adapter"]
        lines.append(f"| {r['case']} | {r['median_s']:.3f} | {r['seq_per_s']:.1f} | {ratio:.3f} |")
    lines += ["", "Batch-1 latency (one sequence of the same length):", "", "| case | p50 ms | p99 ms | n |",
              "|---|---|---|---|"]  # fmt: skip
    for r in result["latency_batch1"]:
        lines.append(f"| {r['case']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['n']} |")
    return "\n".join(lines) + "\n"
