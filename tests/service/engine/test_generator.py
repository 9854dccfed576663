"""Tests for service/engine/generator.py: mixed-adapter continuous batching against HF `generate` + PEFT
per request (tiny Llama and GPT-2), sampling seeds, stop strings, limits, cancellation, detokenization,
and the CUDA-graph decode (cuda_graphs.py).
"""

from __future__ import annotations

import asyncio
import copy
import threading
from pathlib import Path

import pytest
import torch
from factories import EOS, TINY_DECODER, collect, greedy, oracle, randomize_peft, run_plan
from numerics import decoder_reduction, reorder_atol
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from adapters.fingerprint import describe_base
from adapters.format import import_peft_folder, read_adapter
from adapters.peft import LoraModule
from service.engine.cuda_graphs import DecodeGraphs, _buckets
from service.engine.generator import Detokenizer, EngineOverloadedError, GeneratorEngine
from service.engine.model_runner import attend, decode_bias, output_projection
from service.engine.sampling import SamplingParams
from service.engine.sequence import Sequence


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what byte-level BPE vocabularies are made of)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte. Ids 1..127 are ASCII bytes (what the tiny 128-token models emit, so their text is
    clean); multi-byte characters use ids >= 128 and exercise the detokenizer's boundary handling."""
    table = _bytes_to_unicode()
    order = list(range(32, 127)) + list(range(0, 32)) + list(range(127, 256))
    vocab = {"<eos>": EOS, **{table[b]: i + 1 for i, b in enumerate(order)}}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")


def tiny_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    # A wide init makes random tiny models produce varied tokens (the default 0.02 repeats one token).
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TINY_DECODER))
    else:
        config = GPT2Config(
            n_embd=64,
            n_layer=2,
            n_head=4,
            vocab_size=128,
            n_positions=256,
            initializer_range=0.2,
            eos_token_id=EOS,
            bos_token_id=1,
            pad_token_id=EOS,
        )
        model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = None  # the oracle runs to max_new_tokens, as ignore_eos does
    model.generation_config.pad_token_id = EOS
    return model.eval()


# Distinct ranks, alphas, targets and PEFT options per adapter: every adapter exercises a different slot
# layout, and DoRA / lora_bias / rank patterns / PEFT's all-linear decode in the same batches as plain LoRA.
ADAPTERS = {
    "llama": [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(r=8, lora_alpha=8, target_modules="all-linear", use_dora=True),
        dict(r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"], lora_bias=True),
        dict(r=6, lora_alpha=12, target_modules="all-linear", rank_pattern={"o_proj": 2}, use_rslora=True),
    ],
    "gpt2": [
        dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
        dict(r=8, lora_alpha=8, target_modules=["c_attn", "c_proj"], use_dora=True),
        dict(r=2, lora_alpha=4, target_modules=["c_fc"], lora_bias=True),
        dict(r=6, lora_alpha=12, target_modules="all-linear", alpha_pattern={"c_fc": 3}),
    ],
}


def make_adapters(base: torch.nn.Module, arch: str, work: Path, base_info) -> list[tuple[object, object]]:
    """Save real PEFT adapters (random A, B, biases; DoRA magnitudes near their initial norms) and read them
    back the way the service does."""
    out = []
    for i, options in enumerate(ADAPTERS[arch]):
        torch.manual_seed(100 + i)
        cfg = LoraConfig(task_type="CAUSAL_LM", fan_in_fan_out=arch == "gpt2", **options)
        peft_model = get_peft_model(copy.deepcopy(base), cfg).eval()
        randomize_peft(peft_model, 0.3)
        folder = work / f"{arch}-{i}"
        peft_model.save_pretrained(folder)
        import_peft_folder(folder, f"a{i}", "tiny", base_info, task="generation")
        out.append((peft_model, read_adapter(folder, base_info, max_rank=8)))
    return out


@pytest.fixture(params=["llama", "gpt2"])
def arch(request) -> str:
    return request.param


def make_engine(arch: str, **kw) -> tuple[GeneratorEngine, torch.nn.Module]:
    base = tiny_model(arch)
    info = describe_base(base, "tiny", "generation")
    kw = {"num_slots": 6, "max_rank": 8, "max_num_seqs": 4, "max_model_len": 96, **kw}
    return GeneratorEngine(copy.deepcopy(base), byte_tokenizer(), info, **kw), base


@pytest.mark.parametrize(
    "decode",
    [
        "eager",
        "static",  # the CUDA graphs' body (cuda_graphs.py) run eagerly: padded batch buckets, fixed span
        pytest.param("cuda_graphs", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    ],
)
async def test_mixed_batch_matches_peft_per_request(arch: str, decode: str, tmp_path: Path) -> None:
    device = "cuda" if decode == "cuda_graphs" else "cpu"
    engine, base = make_engine(arch, device=device)
    if decode == "static":
        engine.runner.graphs = DecodeGraphs(engine.runner, 4, engine.kv_cache.max_model_len, capture=False)
    adapters = make_adapters(base, arch, tmp_path, engine.base_info)
    for slot, (_, weights) in enumerate(adapters, start=1):
        engine.load_slot(slot, weights)
    # (slot, prompt length, max_tokens, steps to wait before arriving): more requests than KV rows, so some
    # wait; late arrivals join while others decode; two requests share slot 1; slot 0 is the plain base.
    plan = [
        (1, 7, 12, 0),
        (0, 3, 9, 0),
        (2, 15, 14, 0),
        (3, 1, 6, 0),
        (4, 22, 10, 2),
        (1, 5, 11, 5),
        (0, 30, 8, 9),
        (4, 2, 13, 12),
    ]
    rng = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 128, (n,), generator=rng).tolist() for _, n, _, _ in plan]

    got = await run_plan(engine, plan, prompts)
    for i, (slot, _, n, _) in enumerate(plan):
        if slot == 0:
            want = oracle(base.to(device), prompts[i], n)
        else:
            want = oracle(adapters[slot - 1][0].to(device), prompts[i], n)
        assert got[i] == want, f"request {i} (slot {slot}) differs from PEFT + HF generate"
    assert engine.running == 0 and engine.kv_cache_usage == 0.0
    graphs = engine.runner.graphs
    if decode == "eager":
        assert graphs is None
    else:  # the decode steps went through the graphs, in several batch buckets
        assert not graphs.failed and len({key[0] for key in graphs.graphs}) >= 2, graphs.graphs.keys()


async def test_seeded_sampling_is_reproducible_across_batches() -> None:
    engine, _ = make_engine("llama")
    params = dict(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, ignore_eos=True)
    try:
        alone = await collect(engine, [5, 6, 7], SamplingParams(seed=123, **params))
        crowd = await asyncio.gather(
            collect(engine, [9, 9], SamplingParams(seed=1, **params)),
            collect(engine, [5, 6, 7], SamplingParams(seed=123, **params)),
            collect(engine, [1, 2, 3, 4], greedy(5)),
        )
        other = await collect(engine, [5, 6, 7], SamplingParams(seed=124, **params))
    finally:
        engine.shutdown()
    assert crowd[1][0] == alone[0]
    assert other[0] != alone[0]


async def test_model_work_runs_on_the_compute_thread() -> None:
    """Steps and slot copies run on compute.py's one thread, not on the engine's own (OpenMP's workers
    spin only while one thread opens parallel regions): a failure here is a silent 1.4x slowdown."""
    engine, _ = make_engine("llama")
    seen, step = set(), engine.runner.run
    engine.runner.run = lambda *a: seen.add(threading.current_thread().name) or step(*a)
    clear = engine.slots.clear
    engine.slots.clear = lambda *a: seen.add(threading.current_thread().name) or clear(*a)
    try:
        await collect(engine, [5, 6, 7], greedy(3))
        engine.clear_slot(1)
    finally:
        engine.shutdown()
    assert seen == {"compute_0"}


async def test_stop_string_across_token_boundaries_and_max_tokens() -> None:
    engine, _ = make_engine("llama")
    prompt = [10, 20, 30, 40]
    try:
        ids, text, reason = await collect(engine, prompt, greedy(20))
        assert reason == "length" and len(ids) == 20
        assert text == engine.tokenizer.decode(ids)
        stop = text[5:8]  # three one-byte tokens: the stop string spans token boundaries
        first = text.find(stop)
        ids2, text2, reason2 = await collect(engine, prompt, greedy(20, stop=[stop, "\x00never"]))
    finally:
        engine.shutdown()
    assert reason2 == "stop"
    assert text2 == text[:first]
    assert ids2 == ids[: len(ids2)] and len(ids2) < 20


async def test_eos_finishes_with_stop_and_is_not_in_text() -> None:
    engine, _ = make_engine("llama")
    engine.scheduler.eos_token_ids = frozenset(range(128))  # every token is EOS: stop on the first one
    try:
        ids, text, reason = await collect(engine, [3, 4], SamplingParams(max_tokens=5, temperature=0))
    finally:
        engine.shutdown()
    assert reason == "stop" and len(ids) == 1 and text == ""


async def test_prompt_longer_than_context_is_refused() -> None:
    engine, _ = make_engine("gpt2", max_model_len=16)
    try:
        with pytest.raises(ValueError, match="context"):
            await collect(engine, list(range(1, 17)), greedy(2))
        with pytest.raises(ValueError):
            await collect(engine, [], greedy(2))
        # A prompt that fits but leaves less room than max_tokens stops at the context end.
        ids, _, reason = await collect(engine, list(range(1, 14)), greedy(10))
        assert reason == "length" and len(ids) == 3
    finally:
        engine.shutdown()


async def test_cancel_frees_sequence_within_a_step() -> None:
    engine, _ = make_engine("llama", max_num_seqs=2, max_model_len=256)
    try:
        stream = engine.generate([1, 2, 3], greedy(200))
        await stream.__anext__()
        await stream.__anext__()
        assert engine.running == 1 and engine.kv_cache_usage == 0.5
        await stream.aclose()  # what a client disconnect does to the handler's iterator
        steps = engine.steps
        for _ in range(500):
            if engine.running == 0:
                break
            await asyncio.sleep(0.002)
        assert engine.running == 0 and engine.kv_cache_usage == 0.0
        assert engine.steps <= steps + 1

        task = asyncio.create_task(collect(engine, [4, 5], greedy(200)))
        while engine.running == 0:
            await asyncio.sleep(0.002)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(500):
            if engine.running == 0:
                break
            await asyncio.sleep(0.002)
        assert engine.running == 0 and engine.waiting == 0
        # The engine keeps serving after cancellations.
        ids, _, _ = await collect(engine, [1, 2, 3], greedy(4))
        assert len(ids) == 4
    finally:
        engine.shutdown()


async def test_waiting_queue_bound_raises_overloaded() -> None:
    engine, _ = make_engine("llama", max_waiting=0)
    try:
        with pytest.raises(EngineOverloadedError) as info:
            await collect(engine, [1, 2], greedy(2))
        assert info.value.status == 429
    finally:
        engine.shutdown()


def test_slot_engine_protocol_and_metrics() -> None:
    engine, _ = make_engine("gpt2")
    assert engine.tasks == {"generation"} and engine.num_slots == 6 and engine.max_rank == 8
    assert engine.running == engine.waiting == 0 and engine.kv_cache_usage == 0.0
    assert engine.running_slots == engine.waiting_slots == []
    engine.clear_slot(1)
    # The context page-locks host copies for engines whose `device` is CUDA (service/context.py).
    assert engine.device == torch.device("cpu") and engine.runner.graphs is None


@pytest.mark.parametrize(
    "text", ["héllo wörld", "emoji 🙂🚀 done", "日本語のテキスト", "a\u00e9\u0301b", "plain"]
)
def test_detokenizer_handles_multibyte_boundaries(text: str) -> None:
    tok = byte_tokenizer()
    ids = tok(text)["input_ids"]
    assert len(ids) > len(text) or text == "plain"  # one token per byte: characters split across tokens
    detok = Detokenizer(tok, [5, 6], [])
    pieces = []
    for token in ids:
        detok.push(token)
        piece, stopped = detok.take(final=False)
        assert "\ufffd" not in piece and not stopped
        pieces.append(piece)
    detok.flush()
    pieces.append(detok.take(final=True)[0])
    assert "".join(pieces) == text


def test_detokenizer_holds_back_possible_stop_prefix() -> None:
    tok = byte_tokenizer()
    detok = Detokenizer(tok, [5], ["END"])
    sent = ""
    for token in tok("abcENxENDzz")["input_ids"]:
        detok.push(token)
        piece, stopped = detok.take(final=False)
        sent += piece
        assert "abcENx".startswith(sent)  # nothing of the stop string ever leaks out, even partially
        if stopped:
            break
    assert stopped and sent == "abcENx"


@pytest.mark.real_model
async def test_smollm2_matches_hf_generate_and_decodes_text() -> None:
    from adapters.bases import load_base

    model, tok = load_base("SmolLM2-135M-Instruct", "generation")
    ref = copy.deepcopy(model)
    ref.generation_config.eos_token_id = None
    engine = GeneratorEngine(model, tok, None, num_slots=2, max_rank=8, max_num_seqs=4, max_model_len=256)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in ["What is the capital of France?", "Say hello in Spanish."]
    ]
    prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompts]
    try:
        got = await asyncio.gather(*(collect(engine, p, greedy(12)) for p in prompts))
    finally:
        engine.shutdown()
    for p, (ids, text, _) in zip(prompts, got, strict=True):
        assert ids == oracle(ref, p, 12)
        assert text == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("bias", [False, True])
def test_output_projection_matches_lm_head(bias: bool) -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    project = output_projection(head)
    assert project is not head  # the CPU fast path: oneDNN with a reordered copy of the weight (PackedLinear)
    h = torch.randn(5, 16)
    torch.testing.assert_close(project(h), head(h), rtol=1e-5, atol=1e-6)
    assert head.weight.is_contiguous() and head.weight.shape == (50, 16)  # the original stays as it was


def test_output_projection_leaves_other_modules_alone() -> None:
    wrapped = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert output_projection(wrapped) is wrapped


@pytest.mark.parametrize("groups", [1, 3])  # MHA (GPT-2) and GQA folded into the query axis (Llama)
def test_decode_attention_matches_sdpa(groups: int) -> None:
    """attend's CPU decode path (matmul + additive mask + softmax) equals scaled_dot_product_attention."""
    torch.manual_seed(0)
    B, Hkv, span, hd = 5, 2, 11, 8
    q, k, v = torch.randn(B, Hkv, groups, hd), torch.randn(B, Hkv, span, hd), torch.randn(B, Hkv, span, hd)
    positions = torch.tensor([[0], [3], [10], [7], [5]])  # row 0 sees only its first position
    mask = (torch.arange(span).view(1, 1, span) <= positions.unsqueeze(-1)).unsqueeze(1).repeat(1, 1, groups, 1)
    bias = decode_bias(mask, torch.float32)
    assert bias is not None and decode_bias(mask, torch.bfloat16) is None  # bf16 keeps SDPA
    got = attend(q, k, v, mask, bias, 0.3)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attend(q, k, v, mask, None, 0.3), want)  # no bias: SDPA itself


# DecodeGraphs (cuda_graphs.py). On CPU the graphs' body runs eagerly (capture=False) on the same static
# buffers: padding to batch buckets, the fixed attention span and the static LoRA routing are checked
# against the eager decode; capture and replay themselves run where CUDA is available.


def test_buckets() -> None:
    assert _buckets(4, (1, 2, 4, 8), 16) == [1, 2, 4]
    assert _buckets(40, (1, 2, 4, 8), 16) == [1, 2, 4, 8, 16, 32, 40]
    assert _buckets(96, (), 256) == [96]
    assert _buckets(1024, (), 256) == [256, 512, 768, 1024]


def _prefilled(engine, lengths: list[int], slots: list[int]) -> list[Sequence]:
    """Sequences in KV rows 0..n-1, prefilled and one token sampled, ready to decode."""
    rng = torch.Generator().manual_seed(3)
    seqs = []
    for n, slot in zip(lengths, slots, strict=True):
        seq = Sequence(torch.randint(1, 128, (n,), generator=rng).tolist(), SamplingParams(temperature=0), slot)
        engine.kv_cache.allocate(seq)
        seqs.append(seq)
    for seq, token in zip(seqs, engine.runner.run(seqs, True), strict=True):
        seq.num_cached = len(seq)
        seq.append_token(token)
    return seqs


def _random_slots(engine) -> None:
    torch.manual_seed(1)
    for module in engine.slots.modules.values():
        for slot in (1, 2):
            A, B = torch.randn(4, module.in_features), torch.randn(module.out_features, 4)
            module.load_slot(slot, LoraModule(A, B, 0.5))  # host tensors: copied to the slot's device


def _engine(device: str = "cpu", **kw):
    engine, _ = make_engine("llama", device=device, **kw)
    _random_slots(engine)
    return engine


@pytest.mark.parametrize("slots", [[0, 0, 0], [1, 0, 2]])
def test_static_step_matches_eager_decode(slots: list[int]) -> None:
    engine = _engine()
    graphs = DecodeGraphs(engine.runner, 4, engine.kv_cache.max_model_len, capture=False)
    seqs = _prefilled(engine, [5, 11, 2], slots)
    with torch.inference_mode():
        want = engine.runner.decode(seqs)
        got = graphs.logits(seqs)  # 3 rows padded to the bucket of 4; row 3 is free
    # The static body sums in other orders (SDPA over the fixed span, gathered LoRA): bound the difference
    # by the reduction lengths on the path (tests/numerics.py), not by a fixed 1e-5 that one CPU met.
    span = engine.kv_cache.max_model_len
    atol = reorder_atol(torch.float32, decoder_reduction(engine.model.config, span), float(want.abs().max()))
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    assert list(graphs.graphs) == [(4, 96, slots != [0, 0, 0])]
    assert graphs.slot_ids[:4].tolist() == [*slots, 0] and graphs.positions[:4, 0].tolist() == [5, 11, 2, 0]


def test_rows_not_from_zero_and_capture_failure_fall_back_to_eager(monkeypatch) -> None:
    engine = _engine()
    graphs = DecodeGraphs(engine.runner, 4, engine.kv_cache.max_model_len, capture=False)
    seqs = _prefilled(engine, [4, 6, 3], [1, 2, 0])
    with torch.inference_mode():
        want = engine.runner.decode(seqs[1:])
        torch.testing.assert_close(graphs.logits(seqs[1:]), want)  # rows 1..2: not what a graph covers
        assert graphs.graphs == {} and not graphs.failed

        def broken(key):
            raise RuntimeError("operation not permitted when stream is capturing")

        monkeypatch.setattr(graphs, "_capture", broken)
        want = engine.runner.decode(seqs)
        torch.testing.assert_close(graphs.logits(seqs), want)
        assert graphs.failed and graphs.graphs == {}
        torch.testing.assert_close(graphs.logits(seqs), want)  # eager from then on


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_graph_replays_new_inputs_on_cuda() -> None:
    engine = _engine("cuda", cuda_graphs=False)
    graphs = DecodeGraphs(engine.runner, 4, engine.kv_cache.max_model_len)
    seqs = _prefilled(engine, [5, 11, 2], [1, 0, 2])
    with torch.inference_mode():
        for _ in range(3):  # capture on the first step, replays after it: each step's own inputs
            want = engine.runner.decode(seqs)
            got = graphs.logits(seqs)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            for seq, token in zip(seqs, got.argmax(-1).tolist(), strict=True):
                seq.num_cached = len(seq)
                seq.append_token(token)
    assert not graphs.failed and list(graphs.graphs) == [(4, 96, True)]


def test_bf16_engine_tracks_fp32(arch: str) -> None:
    """bf16, the GPU default, through the paths a GPU takes (no packed linears, SDPA decode, bf16 LoRA stacks
    and KV cache) and through the static decode body, against the fp32 engine on the same inputs."""
    ref, _ = make_engine(arch)
    half, _ = make_engine(arch, dtype=torch.bfloat16)
    for engine in (ref, half):
        _random_slots(engine)
    graphs = DecodeGraphs(half.runner, 4, half.kv_cache.max_model_len, capture=False)
    slots = [1, 0, 2]
    seqs_ref, seqs_half = _prefilled(ref, [5, 11, 2], slots), _prefilled(half, [5, 11, 2], slots)
    for a, b in zip(seqs_ref, seqs_half, strict=True):
        b.token_ids[-1] = a.token_ids[-1]  # the same next input, whatever bf16 sampled after prefill
    with torch.inference_mode():
        want = ref.runner.decode(seqs_ref)
        for got in (half.runner.decode(seqs_half), graphs.logits(seqs_half)):
            assert got.dtype == torch.float32
            err = float((got - want).norm() / want.norm())
            assert err < 0.1, err  # bf16 rounding: 0.016-0.039 measured on these tiny models
        for seq in seqs_ref:
            seq.slot = 0
        without = ref.runner.decode(seqs_ref)  # the same step with no LoRA: what a dropped adapter would give
    for row in (0, 2):  # the adapter rows move by far more than the bf16 tolerance (~1.4 measured)
        assert float((without[row] - want[row]).norm() / want[row].norm()) > 0.5


async def test_a_failing_row_ends_its_own_request_only(tmp_path: Path) -> None:
    """One request whose sampling fails (a top_k torch cannot take) and one on an adapter with NaN weights
    share steps with three others: those two fail with their own cause, the others get PEFT's tokens."""
    from service.engine.sampling import RowFailedError

    engine, base = make_engine("llama")
    adapters = make_adapters(base, "llama", tmp_path, engine.base_info)
    engine.load_slot(1, adapters[0][1])
    broken = {path: LoraModule(m.A, torch.full_like(m.B, float("nan")), m.scale)
              for path, m in adapters[1][1].lora.items()}  # fmt: skip
    engine.slots.load(2, broken)  # what validation refuses, forced in: the engine must still contain it
    prompts = [[5, 6, 7], [9, 9, 9, 9], [1, 2], [3, 4, 5, 6, 7], [8, 8]]
    poisoned = SamplingParams(max_tokens=6, temperature=1.0, top_k=2**63, top_p=0.9, ignore_eos=True)
    runs = [collect(engine, prompts[0], greedy(6), 1), collect(engine, prompts[1], poisoned, 0),
            collect(engine, prompts[2], greedy(6), 0), collect(engine, prompts[3], greedy(6), 2),
            collect(engine, prompts[4], greedy(6), 1)]  # fmt: skip
    try:
        got = await asyncio.gather(*runs, return_exceptions=True)
    finally:
        engine.shutdown()
    assert isinstance(got[1], RowFailedError) and "sampling failed" in str(got[1])
    assert isinstance(got[3], RowFailedError) and "non-finite" in str(got[3])
    assert got[0][0] == oracle(adapters[0][0], prompts[0], 6) and got[4][0] == oracle(adapters[0][0], prompts[4], 6)
    assert got[2][0] == oracle(base, prompts[2], 6)
    assert engine.running == 0 and engine.kv_cache_usage == 0.0
    # The failed request's NaN K/V is gone: attention masks rows' unused positions, but 0 x NaN is NaN, so
    # stale NaN would poison whichever later batch reads that row's span.
    assert torch.isfinite(engine.kv_cache.k).all() and torch.isfinite(engine.kv_cache.v).all()


async def test_a_key_s_prompt_tokens_in_flight_are_bounded() -> None:
    engine, _ = make_engine("llama", max_tenant_tokens=10)
    try:
        first = engine.generate([5] * 8, greedy(30), 0, "a")
        await first.__anext__()  # admitted: 8 of a's 10 tokens in flight
        with pytest.raises(EngineOverloadedError, match="prompt tokens in flight"):
            await collect_tenant(engine, [6] * 3, "a")
        assert len((await collect_tenant(engine, [6] * 3, "b"))[0]) == 4  # another key is not affected
        await first.aclose()  # a's tokens come back when its request ends
        assert len((await collect_tenant(engine, [6] * 3, "a"))[0]) == 4
    finally:
        engine.shutdown()


async def collect_tenant(engine: GeneratorEngine, prompt: list[int], tenant: str):
    ids, reason = [], None
    async for delta in engine.generate(prompt, greedy(4), 0, tenant):
        ids += delta.token_ids
        reason = delta.finish_reason
    return ids, reason
