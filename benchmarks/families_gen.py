"""families_gen suite: decode speed of every decoder family the engine serves natively (service/engine/
decoders.py) against HF `generate` on the same model: a random model of each family's shape class
(6 layers x 384 hidden, GQA 6/2 heads, vocab 8192; GPT-2 6 x 384 with 6 heads), fp32, no adapter, greedy,
batch 1 and batch 8, the cases' repetitions interleaved. One result row per family (`case`); measured on
CPU (on CUDA it runs the same cases through the engine's CUDA graphs, untested so far).

Decode tokens/s = rows / mean gap between a row's successive tokens (prefill excluded: the first token's
time is TTFT). Ours goes through GeneratorEngine's async API as the server drives it (engine thread and
detokenizer included); HF `generate` runs the batch left-padded with its KV cache, a streamer stamping
each step. Prompts are random ids (16-23 tokens) decoded by SmolLM2's tokenizer, whose first 8192 ids
the models' vocabulary covers. Mistral and Gemma2 get a 64-position sliding window, which the
generations cross, so their window masks are part of what is timed.
"""

from __future__ import annotations

import copy
import time

import torch

from benchmarks.common import machine_info, machine_markdown, median, set_threads, time_interleaved
from benchmarks.gen import MODEL, _engine_job, _hf_job, _Timings

WINDOW = 64
# family -> (config class, model class, fields beyond the shared shape)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", None),  # its own field names: see _config
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 64}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 64}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 64, "sliding_window": WINDOW, "query_pre_attn_scalar": 64},
    ),  # fmt: skip
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}
SHAPE = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
             num_key_value_heads=2, vocab_size=8192, max_position_embeddings=512)  # fmt: skip
QUICK_SHAPE = dict(SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   vocab_size=512)  # fmt: skip


def _model(family: str, shape: dict) -> torch.nn.Module:
    import transformers

    config_cls, model_cls, fields = FAMILIES[family]
    if fields is None:  # GPT-2
        config = transformers.GPT2Config(n_embd=shape["hidden_size"], n_layer=shape["num_hidden_layers"],
                                         n_head=shape["num_attention_heads"], vocab_size=shape["vocab_size"],
                                         n_positions=shape["max_position_embeddings"])  # fmt: skip
    else:
        config = getattr(transformers, config_cls)(**shape, **fields, pad_token_id=0)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    model.generation_config.eos_token_id = None  # every case generates exactly its new tokens
    return model


def _decode_tps(timings: _Timings, rows: int) -> float:
    return rows / (sum(timings.itl) / len(timings.itl))


def _family(
    family: str, shape: dict, tokenizer, prompts: list[list[int]], new_tokens: int, reps: int, device: str
) -> dict:
    from service.engine.generator import GeneratorEngine

    hf = _model(family, shape).to(device)
    engine = GeneratorEngine(copy.deepcopy(hf), tokenizer, None, num_slots=2, max_rank=8, max_num_seqs=8,
                             max_model_len=256, device=device)  # fmt: skip
    jobs = {}
    for rows in (1, 8):
        batch = prompts[:rows]
        jobs[f"ours_b{rows}"] = (rows, lambda t, b=batch: _engine_job(engine, b, [0] * len(b), new_tokens, t))
        jobs[f"hf_b{rows}"] = (rows, lambda t, b=batch: _hf_job(hf, tokenizer, b, new_tokens, device, t))
    timings = {name: _Timings() for name in jobs}
    cases = {name: make(timings[name]) for name, (_, make) in jobs.items()}
    times = time_interleaved(cases, warmup=1, reps=reps, device=device)
    engine.shutdown()
    # The warm-up's gaps are in the timings too: drop them (the first len/(reps+1) of each case).
    for t in timings.values():
        t.itl = t.itl[len(t.itl) // (reps + 1) :]
    out = {"case": family, "params_m": sum(p.numel() for p in hf.parameters()) / 1e6}
    for name, (rows, _) in jobs.items():
        out[f"{name}_decode_tps"] = _decode_tps(timings[name], rows)
        out[f"{name}_total_tps"] = rows * new_tokens / median(times[name])
        out[f"{name}_times_s"] = times[name]
    for rows in (1, 8):
        out[f"ratio_b{rows}"] = out[f"ours_b{rows}_decode_tps"] / out[f"hf_b{rows}_decode_tps"]
    return out


def run(device: str, quick: bool) -> tuple[dict, str]:
    from transformers import AutoTokenizer

    from adapters.bases import resolve_base

    set_threads(device, quick)
    machine = machine_info(device)
    shape = QUICK_SHAPE if quick else SHAPE
    new_tokens, reps = (8, 1) if quick else (48, 3)
    tokenizer = AutoTokenizer.from_pretrained(resolve_base(MODEL))
    rng = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, shape["vocab_size"], (16 + i,), generator=rng).tolist() for i in range(8)]
    started = time.perf_counter()
    rows = [_family(f, shape, tokenizer, prompts, new_tokens, reps, device) for f in FAMILIES]
    result = {
        "suite": "families-gen",
        "quick": quick,
        "machine": machine,
        "setup": {"shape": shape, "gpt2": "n_embd/n_layer/n_head/n_positions from the same shape",
                  "sliding_window": {"mistral": WINDOW, "gemma2": WINDOW}, "dtype": "float32",
                  "new_tokens": new_tokens, "prompt_tokens": list(map(len, prompts)), "reps": reps,
                  "decoding": "greedy, EOS ignored, no adapter", "tokenizer": MODEL},
        "families": rows,
        "wall_s": time.perf_counter() - started,
    }  # fmt: skip
    return result, _markdown(result)


def _markdown(r: dict) -> str:
    s = r["setup"]
    shape = s["shape"]
    lines = [
        f"# families-gen suite ({r['machine']['device']}, {'quick' if r['quick'] else 'full'})",
        "",
        machine_markdown(r["machine"], s["dtype"]),
        f"- shapes: random models, {shape['num_hidden_layers']} layers x {shape['hidden_size']} hidden, "
        f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads (GPT-2: "
        f"{shape['num_attention_heads']} heads, no GQA), vocab {shape['vocab_size']}; sliding window "
        f"{WINDOW} for Mistral and Gemma2; {s['new_tokens']} new tokens ({s['decoding']}), prompts "
        f"{min(s['prompt_tokens'])}-{max(s['prompt_tokens'])} tokens; median of {s['reps']} interleaved reps",
        "- case = decoder family; decode tokens/s = rows / mean gap between a row's tokens (prefill excluded); "
        "ratio = ours / HF",
        "",
        "| case | params (M) | ours b1 | HF b1 | ratio b1 | ours b8 | HF b8 | ratio b8 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in r["families"]:
        lines.append(f"| {f['case']} | {f['params_m']:.1f} | {f['ours_b1_decode_tps']:.1f} | "
                     f"{f['hf_b1_decode_tps']:.1f} | {f['ratio_b1']:.2f} | {f['ours_b8_decode_tps']:.1f} | "
                     f"{f['hf_b8_decode_tps']:.1f} | {f['ratio_b8']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # until the suite is registered in benchmarks/__main__.py
    import sys

    from transformers.utils import logging as hf_logging

    from benchmarks.common import write_results

    hf_logging.set_verbosity_error()
    result, markdown = run("cpu", quick="--quick" in sys.argv)
    print(markdown)
    if "--no-write" not in sys.argv:
        for path in write_results("families-gen", "cpu", result, markdown):
            print(f"wrote {path}", file=sys.stderr)
