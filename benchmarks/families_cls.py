"""families_cls suite: ClassifierEngine against the Hugging Face model's own forward, per encoder family, on
small-but-not-tiny random configs (hidden 256, 4 layers): batch 1 and batch 32, no adapter and 8 adapters
mixed (LoRA rank 16 on every Linear the engine wraps, in slots padded to the service's default max_rank,
plus the head Linears it merges per slot).

Run: `python -c "from benchmarks.families_cls import main; main()"` (writes benchmarks/results/families-cls-*).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch

from benchmarks.common import machine_info, machine_markdown, median, set_threads, time_interleaved
from service.config import Settings

HIDDEN, LAYERS, HEADS, INTER, VOCAB = 256, 4, 4, 1024, 1000
N_ADAPTERS, RANK = 8, 16
MAX_RANK = Settings().max_rank  # what `make serve` pads every slot to
REPS = {True: 1, False: 8}  # by --quick


def _dims(quick: bool) -> tuple[int, int, int, int]:
    """(hidden, layers, heads, intermediate); --quick only checks that the suite runs: tiny shapes."""
    return (64, 2, 2, 128) if quick else (HIDDEN, LAYERS, HEADS, INTER)


def _configs(quick: bool) -> dict:
    import transformers as T

    h, layers, heads, inter = _dims(quick)
    common = dict(vocab_size=VOCAB, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=inter)  # fmt: skip
    return {
        "bert": T.BertConfig(**common),
        "roberta": T.RobertaConfig(**common, max_position_embeddings=514, pad_token_id=1),
        "electra": T.ElectraConfig(**common, embedding_size=h // 2),
        "distilbert": T.DistilBertConfig(vocab_size=VOCAB, dim=h, n_layers=layers, n_heads=heads, hidden_dim=inter),
        "deberta-v3": T.DebertaV2Config(**common, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                        position_biased_input=False, position_buckets=256, share_att_key=True,
                                        norm_rel_ebd="layer_norm", max_relative_positions=-1),
        "modernbert": T.ModernBertConfig(**{**common, "intermediate_size": inter * 3 // 4}, pad_token_id=0,
                                         bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3),
    }  # fmt: skip


def _random_adapter(engine, gen: torch.Generator) -> SimpleNamespace:
    """Rank-16 LoRA on every wrapped Linear and every head Linear (merged per slot), the base's head."""
    from adapters.peft import LoraModule

    shapes = {p: (m.in_features, m.out_features) for p, m in engine.slots.modules.items()}
    shapes |= {p: (m.in_features, m.out_features) for p, m in engine.heads.linears.items()
               if not p.endswith(engine.heads.family.output)}  # fmt: skip
    lora = {p: LoraModule(0.02 * torch.randn(RANK, i, generator=gen), 0.02 * torch.randn(o, RANK, generator=gen),
                          2.0) for p, (i, o) in shapes.items()}  # fmt: skip
    return SimpleNamespace(lora=lora, head={}, manifest=SimpleNamespace(labels=None))


def _family(name: str, config, device: str, quick: bool) -> dict:
    from transformers import AutoModelForSequenceClassification

    from service.engine.classifier import ClassifierEngine

    torch.manual_seed(0)
    config.num_labels = 2
    hf = AutoModelForSequenceClassification.from_config(config).to(device).eval()
    engine_model = AutoModelForSequenceClassification.from_config(config)
    engine_model.load_state_dict(hf.state_dict())
    tok = SimpleNamespace(pad_token_id=config.pad_token_id)
    # The service's default max_rank (slots padded to it), with adapters of rank RANK in them.
    engine = ClassifierEngine(engine_model, tok, object(), num_slots=N_ADAPTERS + 1, max_rank=MAX_RANK,
                              device=device)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    for slot in range(1, N_ADAPTERS + 1):
        engine.load_slot(slot, _random_adapter(engine, gen))

    batch, seq = (4, 16) if quick else (32, 64)
    ids = torch.randint(5, VOCAB, (batch, seq), generator=gen).to(device)
    mask = torch.ones_like(ids)
    mixed = torch.tensor([1 + i % N_ADAPTERS for i in range(batch)])
    cases = {
        "hf_batch1": lambda: hf(input_ids=ids[:1], attention_mask=mask[:1]),
        "ours_batch1_no_adapter": lambda: engine.logits(ids[:1], mask[:1], torch.tensor([0])),
        "ours_batch1_adapter": lambda: engine.logits(ids[:1], mask[:1], torch.tensor([1])),
        f"hf_batch{batch}": lambda: hf(input_ids=ids, attention_mask=mask),
        f"ours_batch{batch}_no_adapter": lambda: engine.logits(ids, mask, torch.zeros_like(mixed)),
        f"ours_batch{batch}_{N_ADAPTERS}_adapters": lambda: engine.logits(ids, mask, mixed),
    }
    with torch.inference_mode():
        times = time_interleaved(cases, warmup=1 if quick else 2, reps=REPS[quick], device=device)
    hf1, hfb = median(times["hf_batch1"]), median(times[f"hf_batch{batch}"])
    rows = []
    for case, ts in times.items():
        t = median(ts)
        n = 1 if "batch1_" in case or case == "hf_batch1" else batch
        rows.append({"case": case, "median_ms": 1e3 * t, "seq_per_s": n / t,
                     "speedup_vs_hf": (hf1 if n == 1 else hfb) / t, "times_s": ts})  # fmt: skip
    return {"family": name, "path": "native layer loop" if engine.layers is not None else
            ("own forward per slot group" if engine.per_slot else "own forward"), "batch": batch, "seq_len": seq,
            "rows": rows}  # fmt: skip


def run(device: str, quick: bool) -> tuple[dict, str]:
    set_threads(device, quick)
    if device == "cpu":
        # One thread: on the shared 2-core machine (load average ~5 while others work), a 2-thread run
        # measured a 4-layer batch-1 forward at ~120 ms, each op waiting for a preempted thread; the
        # ratios, not the absolute times, are what this suite compares.
        torch.set_num_threads(1)
    machine = machine_info(device)
    families = []
    for name, config in _configs(quick).items():
        families.append(_family(name, config, device, quick))
        print(f"families_cls: {name} done", file=sys.stderr, flush=True)
    result = {
        "suite": "families-cls",
        "quick": quick,
        "machine": machine,
        "setup": {"dtype": "float32", **dict(zip(("hidden", "layers", "heads", "intermediate"), _dims(quick), strict=True)),
                  "vocab": VOCAB, "adapters": N_ADAPTERS, "rank": RANK, "max_rank": MAX_RANK,
                  "weights": "random (seeded)",
                  "lora_targets": "every Linear the engine wraps + head Linears (merged per slot)",
                  "reps": REPS[quick], "timing": "median of interleaved reps"},
        "families": families,
    }  # fmt: skip
    return result, _markdown(result)


def _markdown(result: dict) -> str:
    s = result["setup"]
    lines = [
        f"# families-cls benchmark ({'quick' if result['quick'] else 'full'})",
        "",
        machine_markdown(result["machine"], s["dtype"]),
        f"- random configs: hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads, intermediate"
        f" {s['intermediate']}; {s['adapters']} adapters r={s['rank']} (slots of max_rank {s['max_rank']}) on"
        f" {s['lora_targets']};"
        f" {s['timing']} ({s['reps']})",
        "- speedup = HF `model(**batch)` time / ours at the same batch (> 1: ours is faster); the HF model has"
        " no adapters, so the adapter rows also show what serving LoRA costs",
        "",
        "| case | family | engine path | median ms | seq/s | speedup vs HF |",
        "|---|---|---|---|---|---|",
    ]
    for f in result["families"]:
        for r in f["rows"]:
            lines.append(f"| {r['case']} | {f['family']} | {f['path']} | {r['median_ms']:.2f} |"
                         f" {r['seq_per_s']:.1f} | {r['speedup_vs_hf']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    from benchmarks.common import write_results

    quick = "--quick" in sys.argv
    result, markdown = run("cpu", quick)
    print(markdown)
    if not quick:
        print(write_results("families-cls", "cpu", result, markdown))


if __name__ == "__main__":
    main()
