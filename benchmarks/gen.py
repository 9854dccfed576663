"""gen suite: multi-LoRA generation on SmolLM2-135M-Instruct (CPU; on CUDA a GPT-2-small-shaped model in
bf16, batch 32 over 32 adapters, 128 new tokens: the issue's GPU shape), every case in one run on the same prompts:
HF `generate` (base model), PEFT `generate(adapter_names=...)` over a batch mixing all adapters, and our
GeneratorEngine with no adapter, with the 16 requests spread over 8 adapters (the shape the ratios use)
and with one adapter per request.

Every case reports generated tokens/s over the whole job (prefill included), TTFT (request start -> first
token) and ITL (gap between later tokens). HF and PEFT generate the batch together, so their TTFT is the
batch prefill; ours start all requests at once and the engine batches them continuously. A second table
has ours (requests spread over the most adapters) at 1..N concurrent streams, and with requests arriving
one per second (TTFT at 1 request/s).
"""

from __future__ import annotations

import asyncio
import os
import time

import torch

from benchmarks.common import (
    lora_bytes,
    machine_info,
    machine_markdown,
    median,
    peft_adapter_weights,
    percentile,
    randomize_lora_b,
    set_threads,
    stream_reader,
    time_interleaved,
    token_clock,
    weight_bytes,
)

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_LINEARS = ["c_attn", "c_proj", "c_fc"]  # c_proj: attention output and MLP output
TOPICS = ["a cat", "the sea", "a robot", "winter", "a small town", "music", "trains", "the moon"]
MODEL = "SmolLM2-135M-Instruct"


def _prompts(tokenizer, n: int) -> list[list[int]]:
    """Chat prompts of different lengths (about 40 to 55 tokens with the chat template)."""
    out = []
    for i in range(n):
        text = f"Write a short story about {TOPICS[i % len(TOPICS)]}." + " Make it vivid and kind." * (i % 4)
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        out.append(tokenizer(chat, add_special_tokens=False)["input_ids"])
    return out


def _base(device: str):
    """A fresh copy of the base (loading again is faster than deepcopy), generating exactly max_new_tokens."""
    from adapters.bases import load_base

    model, tokenizer = load_base(MODEL, "generation", device=device)
    model.generation_config.eos_token_id = None
    return model, tokenizer


def _gpt2(device: str, dtype: torch.dtype, tiny: bool):
    """The issue's GPU shape: GPT-2-small (12 x 768, 12 heads), random init (seeded: every call gives the
    same weights), with SmolLM2's tokenizer and vocabulary size so prompts and detokenization are real."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from adapters.bases import resolve_base

    tokenizer = AutoTokenizer.from_pretrained(resolve_base(MODEL))
    size = dict(n_embd=64, n_layer=2, n_head=4) if tiny else dict(n_embd=768, n_layer=12, n_head=12)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, **size)
    model = GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    return model, tokenizer


# name -> (model description, LoRA targets, requests, adapter counts, rank, new tokens): SmolLM2 is the
# issue's CPU shape, GPT-2-small its GPU shape (batch 32, 32 adapters, 128 new tokens).
SHAPES = {
    "smollm2": (f"{MODEL} (embedded, dequantized)", ALL_LINEARS, 16, (8, 16), 16, 64),
    "gpt2-small": ("GPT-2-small-shaped (12 x 768), random init, SmolLM2 tokenizer", GPT2_LINEARS, 32, (32,), 16, 128),
}


def _peft(base, n_adapters: int, rank: int, targets: list[str] = ALL_LINEARS):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, target_modules=targets,
                     fan_in_fan_out=base.config.model_type == "gpt2")  # fmt: skip
    model = get_peft_model(base, cfg, adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", cfg)
    randomize_lora_b(model)
    return model.eval()


class _Timings:
    """TTFT and ITL samples of one case, over all its repetitions."""

    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.itl: list[float] = []

    def add(self, start: float, stamps: list[float]) -> None:
        """`stamps`: when each token (or each step's tokens) arrived."""
        self.ttft.append(stamps[0] - start)
        self.itl.extend(b - a for a, b in zip(stamps, stamps[1:], strict=False))


def _engine_job(engine, prompts: list[list[int]], slots: list[int], new_tokens: int, timings: _Timings,
                interval: float = 0.0):  # fmt: skip
    """All requests through the engine's async API, as the server would submit them: at once, or request
    i arriving i * `interval` seconds after the first."""
    from service.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)

    async def one(prompt: list[int], slot: int, delay: float) -> int:
        await asyncio.sleep(delay)
        start, stamps, n = time.perf_counter(), [], 0
        async for delta in engine.generate(prompt, params, slot):
            stamps.extend([time.perf_counter()] * len(delta.token_ids))
            n += len(delta.token_ids)
        timings.add(start, stamps)
        return n

    async def all_requests() -> None:
        counts = await asyncio.gather(*(one(p, s, i * interval) for i, (p, s) in enumerate(zip(prompts, slots,
                                                                                                strict=True))))  # fmt: skip
        assert sum(counts) == len(prompts) * new_tokens, counts

    return lambda: asyncio.run(all_requests())


def _left_padded(prompts: list[list[int]], pad: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), left-padded: what HF needs for batched decoding."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def _hf_job(model, tokenizer, prompts, new_tokens: int, device: str, timings: _Timings, adapter_names=None):
    """Batched HF generate over the same prompts, left-padded (what HF needs for batched decoding).
    A streamer stamps every decoding step: its first call is the prompt, then one per generated token."""
    pad = tokenizer.pad_token_id
    ids, mask = _left_padded(prompts, pad, device)
    width = ids.shape[1]
    kw = {"adapter_names": adapter_names} if adapter_names else {}

    def job() -> None:
        clock, start = token_clock(), time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                                 streamer=clock, **kw)  # fmt: skip
        assert out.shape[1] == width + new_tokens
        timings.add(start, clock.stamps[1:])  # stamps[0] is the prompt itself

    return job


def _latency(engine, prompts: list[list[int]], slots: list[int], streams: int, new_tokens: int) -> dict:
    """TTFT and ITL seen by `streams` concurrent clients (arriving together), ours only."""
    timings = _Timings()
    start = time.perf_counter()
    picks = [i % len(prompts) for i in range(streams)]
    used = [slots[i] for i in picks]
    _engine_job(engine, [prompts[i] for i in picks], used, new_tokens, timings)()
    wall = time.perf_counter() - start
    return {"case": f"ours_streams_{streams}", "streams": streams, "adapters": len(set(used)),
            "tokens_per_s": streams * new_tokens / wall, **_stats(timings)}  # fmt: skip


def _paced(engine, prompts: list[list[int]], slots: list[int], rate: float, count: int, new_tokens: int) -> dict:
    """TTFT and ITL when requests arrive one every 1/rate s (the issue's "TTFT p50 at 1 request/s")."""
    timings = _Timings()
    picks = [i % len(prompts) for i in range(count)]
    used = [slots[i] for i in picks]
    start = time.perf_counter()
    _engine_job(engine, [prompts[i] for i in picks], used, new_tokens, timings, interval=1 / rate)()
    wall = time.perf_counter() - start
    return {"case": f"ours_paced_{rate:g}_rps", "requests": count, "adapters": len(set(used)),
            "tokens_per_s": count * new_tokens / wall, **_stats(timings)}  # fmt: skip


def _decode_steps(engine, hf_model, prompts: list[list[int]], slots: list[int], device: str, rounds: int) -> dict:
    """One decode step of the whole batch (16 rows): ours with no adapter, ours with the rows' `slots`
    (mixed adapters) and HF's forward with its KV cache (no adapter), alternating every 3 steps: the job
    timings above are ~13 s blocks on a machine whose speed drifts within a minute, this pairs the cases
    within a second. Ours runs the engine's model through a second ModelRunner with its own KV cache (the
    engine is idle meanwhile); each appends its greedy token."""
    from service.engine.kv_cache import KVCache
    from service.engine.model_runner import ModelRunner
    from service.engine.sampling import SamplingParams
    from service.engine.sequence import Sequence

    n, dec = len(prompts), engine.runner.decoder
    # At least what a step reads: the weights once, and once each slot from the lowest to the highest the
    # mixed rows use (the CPU laid-out path reads that range; a gathered path reads each row's A/B)
    base_bytes = weight_bytes(engine.runner.model)
    adapter_bytes = lora_bytes(engine.runner.model, max(slots) - min(slots) + 1)
    kv = KVCache(len(dec.blocks), dec.num_kv_heads, dec.head_dim, n, engine.max_model_len,
                 dtype=engine.kv_cache.k.dtype, device=device)  # fmt: skip
    runner = ModelRunner(engine.runner.model, kv, engine.slots)
    if engine.runner.graphs is not None:  # CUDA: the step the engine runs, replayed from graphs
        from service.engine.cuda_graphs import DecodeGraphs

        runner.graphs = DecodeGraphs(runner, n, engine.max_model_len)
    seqs = [Sequence(p, SamplingParams(max_tokens=10**6, temperature=0, ignore_eos=True)) for p in prompts]
    for seq in seqs:
        kv.allocate(seq)

    def ours(prefill: bool = False, slots: list[int] | None = None) -> None:
        for seq, slot in zip(seqs, slots or [0] * n, strict=True):
            seq.slot = slot
        for seq, token in zip(seqs, runner.run(seqs, prefill), strict=True):
            seq.num_cached = len(seq)
            seq.append_token(token)

    ids, mask = _left_padded(prompts, engine.tokenizer.pad_token_id or 0, device)
    state = {"mask": mask}

    def hf(prefill: bool = False) -> None:
        mask = state["mask"] if prefill else torch.cat([state["mask"], state["mask"].new_ones(n, 1)], 1)
        out = hf_model(input_ids=ids if prefill else state["next"], attention_mask=mask,
                       past_key_values=state.get("past"), use_cache=True)  # fmt: skip
        state.update(mask=mask, past=out.past_key_values, next=out.logits[:, -1:].argmax(-1))

    with torch.inference_mode():
        ours(prefill=True)
        hf(prefill=True)
        base_read = stream_reader(base_bytes, device)
        mixed_read = stream_reader(base_bytes + adapter_bytes, device)
        times = time_interleaved({"ours": lambda: [ours() for _ in range(3)],
                                  "ours_mixed": lambda: [ours(slots=slots) for _ in range(3)],
                                  "hf": lambda: [hf() for _ in range(3)],
                                  "read_base": lambda: [base_read() for _ in range(3)],
                                  "read_mixed": lambda: [mixed_read() for _ in range(3)]},
                                 warmup=1, reps=rounds, device=device)  # fmt: skip
    for seq in seqs:
        kv.free(seq)
    step = {k: 1e3 * median(v) / 3 for k, v in times.items()}
    return {"case": "decode_step", "ours_decode_step_ms": step["ours"], "hf_decode_step_ms": step["hf"],
            "ours_mixed_decode_step_ms": step["ours_mixed"], "adapters": len(set(slots)),
            "rounds": rounds, "steps_per_round": 3, "ratio": step["hf"] / step["ours"],
            "mixed_vs_base": step["ours"] / step["ours_mixed"],
            # What the step must read from memory, and a plain read of that many bytes timed alongside
            "weight_mb": base_bytes / 2**20, "lora_mb": adapter_bytes / 2**20,
            "read_base_ms": step["read_base"], "read_mixed_ms": step["read_mixed"],
            "bytes_ceiling": base_bytes / (base_bytes + adapter_bytes),
            "read_ceiling": step["read_base"] / step["read_mixed"]}  # fmt: skip


def _stats(t: _Timings) -> dict:
    ms = lambda values, q: 1e3 * percentile(values, q)  # noqa: E731
    return {"ttft_p50_ms": ms(t.ttft, 50), "ttft_p99_ms": ms(t.ttft, 99),
            "itl_p50_ms": ms(t.itl, 50), "itl_p99_ms": ms(t.itl, 99)}  # fmt: skip


def run(device: str, quick: bool, shape: str | None = None) -> tuple[dict, str]:
    """`shape` (SHAPES): else LORASWAP_BENCH_GEN_SHAPE, else SmolLM2 on CPU and GPT-2-small on CUDA (in bf16,
    the service's GPU default; it needs only SmolLM2's tokenizer, not its weights)."""
    from service.engine.generator import GeneratorEngine

    set_threads(device, quick)
    machine = machine_info(device)
    default = "gpt2-small" if device == "cuda" else "smollm2"
    shape = shape or os.environ.get("LORASWAP_BENCH_GEN_SHAPE") or default
    label, targets, n_req, counts, rank, new_tokens = SHAPES[shape]
    # The shapes: n_req requests over the fewest adapters (`mixed`, compared with PEFT); a second
    # count gives every request its own adapter. --quick only checks that the suite runs.
    if quick:
        n_req, counts, rank, new_tokens = 4, (2, 4), 8, 4
    reps, streams = (1, [1]) if quick else (3, [1, 8, 32])
    paced = (20.0, 2) if quick else (1.0, 10)  # rate (requests/s), requests
    mixed, most = min(counts), max(counts)
    dtype = torch.bfloat16 if device == "cuda" and shape == "gpt2-small" else torch.float32

    def fresh():
        return _base(device) if shape == "smollm2" else _gpt2(device, dtype, tiny=quick)

    base, tok = fresh()
    prompts = _prompts(tok, max(n_req, *streams))
    peft_model = _peft(fresh()[0], mixed, rank, targets)
    engine = GeneratorEngine(fresh()[0], tok, None, num_slots=most + 1, max_rank=rank,
                             max_num_seqs=max(n_req, *streams), max_model_len=256, device=device,
                             dtype=dtype)  # fmt: skip
    for slot in range(1, most + 1):  # adapters beyond PEFT's `mixed` reuse its weights in other slots
        engine.load_slot(slot, peft_adapter_weights(peft_model, f"a{(slot - 1) % mixed}", 2.0))
    spread = {k: [1 + i % k for i in range(len(prompts))] for k in counts}  # slot per prompt
    jobs = {  # name -> (distinct adapters in the batch, job factory given the case's _Timings)
        "hf_generate": (0, lambda t: _hf_job(base, tok, prompts[:n_req], new_tokens, device, t)),
        f"peft_mixed_{mixed}": (mixed, lambda t: _hf_job(peft_model, tok, prompts[:n_req], new_tokens, device,
                                                         t, [f"a{s - 1}" for s in spread[mixed][:n_req]])),
        "ours_base": (0, lambda t: _engine_job(engine, prompts[:n_req], [0] * n_req, new_tokens, t)),
        **{f"ours_mixed_{k}": (k, lambda t, k=k: _engine_job(engine, prompts[:n_req], spread[k][:n_req],
                                                             new_tokens, t))
           for k in counts},
    }  # fmt: skip
    timings = {name: _Timings() for name in jobs}
    cases = {name: make(timings[name]) for name, (_, make) in jobs.items()}
    started = time.perf_counter()
    _engine_job(engine, prompts[:2], [0, 1], 2, _Timings())()  # warm-up: engine thread, kernels
    times = time_interleaved(cases, warmup=0, reps=reps, device=device)
    rows = []
    for name, ts in times.items():
        rows.append({"case": name, "adapters": jobs[name][0], "tokens_per_s": n_req * new_tokens / median(ts),
                     "median_s": median(ts), **_stats(timings[name]), "times_s": ts})  # fmt: skip
    latency = [_latency(engine, prompts, spread[most], s, new_tokens) for s in streams]
    latency.append(_paced(engine, prompts, spread[most], *paced, new_tokens))
    decode = _decode_steps(engine, base, prompts[:n_req], spread[mixed][:n_req], device, rounds=2 if quick else 8)
    engine.shutdown()
    tps = {r["case"]: r["tokens_per_s"] for r in rows}
    ratios = {
        f"ours_mixed_{mixed}_vs_ours_base": tps[f"ours_mixed_{mixed}"] / tps["ours_base"],
        f"ours_mixed_{most}_vs_ours_base": tps[f"ours_mixed_{most}"] / tps["ours_base"],
        "ours_base_vs_hf_generate": tps["ours_base"] / tps["hf_generate"],
        f"ours_mixed_{mixed}_vs_peft_mixed_{mixed}": tps[f"ours_mixed_{mixed}"] / tps[f"peft_mixed_{mixed}"],
    }
    result = {
        "suite": "gen",
        "quick": quick,
        "machine": machine,
        "setup": {"model": label, "shape": shape, "dtype": str(dtype).removeprefix("torch."), "requests": n_req,
                  "adapter_counts": list(counts), "rank": rank, "targets": targets,
                  "new_tokens": new_tokens, "prompt_tokens": list(map(len, prompts)), "reps": reps,
                  "decoding": "greedy, EOS ignored"},
        "cases": rows,
        "ratios": ratios,
        "latency_streams": latency,
        "decode_step": decode,
        "wall_s": time.perf_counter() - started,
    }  # fmt: skip
    return result, _markdown(result)


def _markdown(r: dict) -> str:
    s = r["setup"]
    lines = [
        f"# gen suite ({r['machine']['device']}, {'quick' if r['quick'] else 'full'})",
        "",
        machine_markdown(r["machine"], s["dtype"]),
        f"- shapes: {s['model']}, {s['requests']} requests x {s['new_tokens']} new tokens ({s['decoding']}), "
        f"prompts {min(s['prompt_tokens'])}-{max(s['prompt_tokens'])} tokens, adapters r={s['rank']} on "
        f"{', '.join(s['targets'])}; median of {s['reps']} interleaved reps",
        "",
        "| case | adapters | tokens/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |",
        "|---|---|---|---|---|",
    ]
    for c in [*r["cases"], *r["latency_streams"]]:
        lines.append(f"| {c['case']} | {c['adapters']} | {c['tokens_per_s']:.1f} | "
                     f"{c['ttft_p50_ms']:.0f} / {c['ttft_p99_ms']:.0f} | "
                     f"{c['itl_p50_ms']:.1f} / {c['itl_p99_ms']:.1f} |")  # fmt: skip
    lines += ["", "| ratio (tokens/s) | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in r["ratios"].items()]
    d = r["decode_step"]
    lines += ["", f"Decode step alone ({s['requests']} rows, {d['rounds']} alternating rounds of "
              f"{d['steps_per_round']} steps): ours {d['ours_decode_step_ms']:.1f} ms with no adapter, HF forward "
              f"with its KV cache {d['hf_decode_step_ms']:.1f} ms ({d['ratio']:.2f}x); ours over "
              f"{d['adapters']} adapters {d['ours_mixed_decode_step_ms']:.1f} ms "
              f"({d['mixed_vs_base']:.3f}x our no-adapter step's throughput).",
              "", f"What bounds the mixed step: it reads {d['weight_mb']:.0f} MB of weights plus "
              f"{d['lora_mb']:.0f} MB of adapter A/B, the no-adapter step the weights alone. If both stream at "
              f"one rate, mixed can reach at most {d['bytes_ceiling']:.3f}x the no-adapter step; plain reads of "
              f"those byte counts, timed in the same rounds, took {d['read_base_ms']:.1f} and "
              f"{d['read_mixed_ms']:.1f} ms ({d['read_ceiling']:.3f}x)."]
    return "\n".join(lines) + "\n"
