"""rank suite: what the LoRA of a step costs when adapters of mixed ranks sit in slots of the service's
default max_rank (64), before and after the step's LoRA work follows the batch's largest rank
(service/engine/lora.py, SlotState.rank), in one run; and the quantized bases (quantize.py) next to fp32:
int8, and `auto`'s int4 where lossless (SmolLM2: every block linear, when int4 measures faster here).

"before" is the same engine with the slots' ranks hidden (`slot_ranks = None`: every step reads all 64
columns of A and rows of B), so both run on the same weights, interleaved. Cases:
- SmolLM2-135M decode step, 16 rows over 8 adapters of ranks 4-16 on all seven linears, and 1 row on a
  rank-16 adapter; no adapter as the reference; fp32 (oneDNN-packed), int8 and auto engines.
- MiniLM-L6 classification, 64 texts x 64 tokens over 32 adapters of ranks 4-16 on all six linears; fp32
  and int8 engines (auto leaves MiniLM fp32: its weights are not 4-bit).
"""

from __future__ import annotations

import os

import torch

from benchmarks.common import machine_info, machine_markdown, median, set_threads, time_interleaved

RANKS = (4, 6, 8, 10, 12, 14, 16, 16)


def _random_adapters(slots, n: int, seed: int = 0) -> None:
    from adapters.peft import LoraModule

    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        r = RANKS[i % len(RANKS)]
        slots.load(i + 1, {p: LoraModule(torch.randn(r, m.in_features, generator=g) * 0.02,
                                         torch.randn(m.out_features, r, generator=g) * 0.02, 2.0)
                           for p, m in slots.modules.items()})  # fmt: skip


def _decode_cases(quantization: str, rows: int, quick: bool) -> dict:
    from adapters.bases import DEFAULT_DECODER, load_base
    from service.engine.generator import GeneratorEngine
    from service.engine.sampling import SamplingParams
    from service.engine.sequence import Sequence

    model, tok = load_base(DEFAULT_DECODER, "generation")
    engine = GeneratorEngine(model, tok, None, num_slots=9, max_rank=64, max_num_seqs=rows, max_model_len=256,
                             quantization=quantization)  # fmt: skip
    _random_adapters(engine.slots, 8)
    runner, state = engine.runner, engine.slots.state
    seqs = [Sequence(list(range(100, 140 + i)), SamplingParams(max_tokens=10**6, temperature=0, ignore_eos=True))
            for i in range(rows)]  # fmt: skip
    for seq in seqs:
        engine.kv_cache.allocate(seq)
    mixed = [1 + i % 8 for i in range(rows)] if rows > 1 else [7]  # slot 7 holds a rank-16 adapter

    def step(slots: list[int], ranks) -> None:
        state.slot_ranks = ranks
        for seq, slot in zip(seqs, slots, strict=True):
            seq.slot = slot
        for seq, token in zip(seqs, runner.run(seqs, False), strict=True):
            seq.num_cached = len(seq)
            seq.append_token(token)
            if len(seq) >= 250:  # stay inside max_model_len: restart from the prompt
                del seq.token_ids[40:]
                seq.num_cached = len(seq) - 1

    ranks = state.slot_ranks
    with torch.inference_mode():
        for seq, token in zip(seqs, runner.run(seqs, True), strict=True):
            seq.num_cached = len(seq)
            seq.append_token(token)
        times = time_interleaved({"base": lambda: step([0] * rows, ranks),
                                  "mixed_before": lambda: step(mixed, None),
                                  "mixed_after": lambda: step(mixed, ranks)},
                                 warmup=1, reps=2 if quick else 6, device="cpu")  # fmt: skip
    state.slot_ranks = ranks
    return {k: 1e3 * median(v) for k, v in times.items()}


NAMES = {"none": "fp32", "int8": "int8", "int4-lossless": "auto"}


def _classify_cases(quantization: str, quick: bool) -> dict:
    from adapters.bases import DEFAULT_ENCODER, load_base
    from service.engine.classifier import ClassifierEngine

    model, tok = load_base(DEFAULT_ENCODER, "classification", num_labels=2)
    engine = ClassifierEngine(model, tok, None, num_slots=33, max_rank=64, quantization=quantization)
    _random_adapters(engine.slots, 32)
    n = 8 if quick else 64
    ids = torch.randint(1000, 20000, (n, 64))
    mask = torch.ones_like(ids)
    mixed = [1 + i % 32 for i in range(n)]
    state, ranks = engine.slots.state, engine.slots.state.slot_ranks

    def run(slots, r):
        state.slot_ranks = r
        engine.logits(ids, mask, slots)

    with torch.inference_mode():
        times = time_interleaved({"base": lambda: run([0] * n, ranks), "mixed_before": lambda: run(mixed, None),
                                  "mixed_after": lambda: run(mixed, ranks)},
                                 warmup=1, reps=2 if quick else 4, device="cpu")  # fmt: skip
    state.slot_ranks = ranks
    return {k: 1e3 * median(v) for k, v in times.items()}


def run(device: str, quick: bool) -> tuple[dict, str]:
    """LORASWAP_BENCH_THREADS overrides the thread count (1 on a shared machine: see set_threads)."""
    set_threads(device, quick)
    if os.environ.get("LORASWAP_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["LORASWAP_BENCH_THREADS"]))
    cases = []
    for quantization in NAMES:
        for rows in (16,) if quick else (16, 1):  # --quick: 2 rows, one engine per precision
            ms = _decode_cases(quantization, 2 if quick and rows > 1 else rows, quick)
            cases.append({"case": f"decode_{rows}rows_{NAMES[quantization]}", **ms})
    for quantization in ("none", "int8"):
        cases.append({"case": f"classify_64x64_32adapters_{NAMES[quantization]}", **_classify_cases(quantization, quick)})
    for c in cases:
        c["before_over_base"] = c["mixed_before"] / c["base"]
        c["after_over_base"] = c["mixed_after"] / c["base"]
    result = {"suite": "rank", "quick": quick, "machine": machine_info(device), "setup": {"dtype": "float32", "max_rank": 64, "ranks": RANKS}, "cases": cases}
    md = ["# rank — LoRA work that follows the batch's ranks (max_rank 64, adapters of ranks 4-16)", "",
          machine_markdown(result["machine"], "fp32 / int8 / auto block linears"), "",
          "| case | no adapter ms | mixed, before ms | mixed, after ms | base/mixed before | base/mixed after |",
          "|---|---|---|---|---|---|"]
    for c in cases:
        md.append(f"| {c['case']} | {c['base']:.1f} | {c['mixed_before']:.1f} | {c['mixed_after']:.1f} | "
                  f"{1 / c['before_over_base']:.2f} | {1 / c['after_over_base']:.2f} |")
    return result, "\n".join(md) + "\n"
