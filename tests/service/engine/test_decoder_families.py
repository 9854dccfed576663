"""Tests for service/engine/decoders.py: every decoder family the runner serves natively (Qwen2, Qwen3,
Mistral, Gemma, Gemma2, Phi-3; Llama and GPT-2 are in test_generator.py) against HF `generate` and PEFT,
token for token, through the eager decode and the CUDA graphs' static body (run eagerly on CPU).

Tiny random configs, built in-process: a wide init so greedy decoding produces varied tokens, random norm
weights and biases (HF initialises them to ones/zeros, under which a swapped norm or a dropped bias would
go unnoticed), sliding windows of 8-16 positions that prompts and generations cross, soft-caps that bite.
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from factories import EOS, TINY_DECODER, byte_tokenizer, collect, greedy, oracle, randomize_adapter, run_plan
from numerics import decoder_reduction, reorder_atol
from peft import LoraConfig, get_peft_model

from adapters.fingerprint import describe_base
from adapters.format import import_peft_folder, read_adapter
from adapters.peft import LoraModule
from service.engine.cuda_graphs import DecodeGraphs
from service.engine.decoders import DECODERS, decoder_for
from service.engine.generator import GeneratorEngine
from service.engine.lora import MultiLoraLinear
from service.engine.model_runner import attend, attention_mask, decode_bias
from service.engine.sampling import SamplingParams
from service.engine.sequence import Sequence

WINDOW = 8
# family -> (config class, model class, config fields beyond COMMON, an adapter's target list)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, ["q_proj", "k_proj", "v_proj"]),
    # Sliding layers from layer 1 on (Qwen's max_window_layers), full attention in layer 0.
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        {"head_dim": 16, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
        ["q_proj", "o_proj", "up_proj"],
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}, ["v_proj", "down_proj"]),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}, ["k_proj", "gate_proj"]),
    # Layers alternate sliding (0, 2) and global (1); query_pre_attn_scalar != head_dim sets the scaling.
    # Untied: with the post-norms bounding each block's output, a tied head predicts the input token again.
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "head_dim": 16,
            "sliding_window": WINDOW,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 4.0,
            "final_logit_softcapping": 6.0,
            "tie_word_embeddings": False,
        },
        ["q_proj", "v_proj", "o_proj", "down_proj"],
    ),
    # Partial rotary (half of each head rotated) and a window on every layer.
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {"partial_rotary_factor": 0.5, "sliding_window": 2 * WINDOW},
        ["qkv_proj", "down_proj"],
    ),
}
COMMON = {**TINY_DECODER, "num_hidden_layers": 3}


def tiny_family_model(family: str, **overrides) -> torch.nn.Module:
    config_cls, model_cls, fields, _ = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**COMMON, **fields, **overrides})
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param), alpha=0.3)
    model.generation_config.eos_token_id = None  # the oracle runs to max_new_tokens, as ignore_eos does
    model.generation_config.pad_token_id = EOS
    return model.eval()


def family_adapters(base: torch.nn.Module, family: str, work: Path, base_info) -> list[tuple[object, object]]:
    """Two real PEFT adapters: every linear ("all-linear", rank 8) and a few (a list, rank 4), random A and
    B, saved by PEFT and read back through the service's import path."""
    out = []
    for i, (r, alpha, targets) in enumerate([(8, 16, "all-linear"), (4, 4, FAMILIES[family][3])]):
        torch.manual_seed(100 + i)
        cfg = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, target_modules=targets)
        peft_model = get_peft_model(copy.deepcopy(base), cfg).eval()
        randomize_adapter(peft_model, 0.3)
        folder = work / f"{family}-{i}"
        peft_model.save_pretrained(folder)
        import_peft_folder(folder, f"a{i}", "tiny", base_info, task="generation")
        out.append((peft_model, read_adapter(folder, base_info, max_rank=8)))
    return out


def family_engine(family: str, **kw) -> tuple[GeneratorEngine, torch.nn.Module]:
    base = tiny_family_model(family)
    info = describe_base(base, "tiny", "generation")
    kw = {"num_slots": 3, "max_rank": 8, "max_num_seqs": 4, "max_model_len": 64, **kw}
    return GeneratorEngine(copy.deepcopy(base), byte_tokenizer(), info, **kw), base


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


def _prompts(lengths: list[int], seed: int = 7) -> list[list[int]]:
    rng = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (n,), generator=rng).tolist() for n in lengths]


async def test_greedy_matches_hf_generate(family: str) -> None:
    """Batched greedy decoding equals HF `generate` per prompt; prompts shorter and longer than the window."""
    engine, base = family_engine(family)
    lengths, n = [3, 11, 21, 6], 24  # up to 45 positions: several windows of 8 (16 for Phi-3)
    prompts = _prompts(lengths)
    try:
        got = await asyncio.gather(*(collect(engine, p, greedy(n)) for p in prompts))
    finally:
        engine.shutdown()
    for prompt, (ids, _, reason) in zip(prompts, got, strict=True):
        assert reason == "length"
        assert ids == oracle(base, prompt, n), f"{family}: prompt of {len(prompt)} differs from HF generate"
    assert len({t for ids, _, _ in got for t in ids}) > 10  # varied tokens, not one repeated


@pytest.mark.parametrize(
    "decode",
    [
        "eager",
        "static",  # the CUDA graphs' body (cuda_graphs.py) run eagerly: padded batch buckets, fixed span
        pytest.param(
            "cuda_graphs", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
        ),
    ],
)
async def test_mixed_adapters_match_peft_per_request(family: str, decode: str, tmp_path: Path) -> None:
    device = "cuda" if decode == "cuda_graphs" else "cpu"
    engine, base = family_engine(family, device=device)
    if decode == "static":
        engine.runner.graphs = DecodeGraphs(engine.runner, 4, engine.kv_cache.max_model_len, capture=False)
    adapters = family_adapters(base, family, tmp_path, engine.base_info)
    for slot, (_, weights) in enumerate(adapters, start=1):
        engine.load_slot(slot, weights)
    # (slot, prompt length, max_tokens, steps to wait): more requests than KV rows; late arrivals join
    # running decodes; slot 0 is the plain base.
    plan = [(1, 5, 16, 0), (2, 13, 14, 0), (0, 9, 12, 0), (1, 20, 10, 0), (2, 2, 18, 3), (0, 17, 9, 6)]
    prompts = _prompts([n for _, n, _, _ in plan], seed=11)

    got = await run_plan(engine, plan, prompts)
    for i, (slot, _, n, _) in enumerate(plan):
        model = (base if slot == 0 else adapters[slot - 1][0]).to(device)
        assert got[i] == oracle(model, prompts[i], n), (
            f"{family}: request {i} (slot {slot}) differs from PEFT"
        )
    if decode != "eager":  # the decode steps went through the graphs, in several batch buckets
        graphs = engine.runner.graphs
        assert not graphs.failed and len({key[0] for key in graphs.graphs}) >= 2, graphs.graphs.keys()


def _allocated(engine: GeneratorEngine, lengths: list[int], slots: list[int]) -> list[Sequence]:
    """Sequences of random prompts in KV rows 0..n-1, not yet prefilled."""
    seqs = []
    for prompt, slot in zip(_prompts(lengths, seed=3), slots, strict=True):
        seq = Sequence(prompt, SamplingParams(temperature=0), slot)
        engine.kv_cache.allocate(seq)
        seqs.append(seq)
    return seqs


def _advance(seqs: list[Sequence], logits: torch.Tensor) -> None:
    for seq, token in zip(seqs, logits.argmax(-1).tolist(), strict=True):
        seq.num_cached = len(seq)
        seq.append_token(token)


def _atol(engine: GeneratorEngine, want: torch.Tensor) -> float:
    span = engine.kv_cache.max_model_len
    return reorder_atol(torch.float32, decoder_reduction(engine.model.config, span), float(want.abs().max()))


def test_logits_match_hf_forward(family: str) -> None:
    """Prefill and decode logits equal the HF model's own forward, not just their argmax: final-logit
    soft-capping and the embedding scale change logits without changing greedy tokens."""
    engine, base = family_engine(family)
    seqs = _allocated(engine, [21, 4, 12], [0, 0, 0])
    with torch.inference_mode():
        for step in range(3):  # prefill, then two decode steps
            got = engine.runner.prefill(seqs) if step == 0 else engine.runner.decode(seqs)
            want = torch.stack([base(torch.tensor([s.token_ids])).logits[0, -1] for s in seqs])
            torch.testing.assert_close(got, want, rtol=0, atol=_atol(engine, want))
            _advance(seqs, got)


@pytest.mark.parametrize("family", ["gemma2", "mistral", "qwen3", "phi3"])
def test_static_step_matches_eager_decode(family: str) -> None:
    """The static decode body (fixed span, padded bucket, gathered LoRA) equals the eager decode where the
    new attention features act: windows narrower than the span, soft-caps, q/k norms."""
    engine, _ = family_engine(family)
    torch.manual_seed(1)
    for module in engine.slots.modules.values():
        module.load_slot(1, LoraModule(torch.randn(4, module.in_features), torch.randn(module.out_features, 4), 0.5))
    graphs = DecodeGraphs(engine.runner, 4, engine.kv_cache.max_model_len, capture=False)
    seqs = _allocated(engine, [30, 4, 19], [1, 0, 1])  # beyond, within and around the window
    with torch.inference_mode():
        _advance(seqs, engine.runner.prefill(seqs))
        want = engine.runner.decode(seqs)
        got = graphs.logits(seqs)  # 3 rows padded to the bucket of 4
    torch.testing.assert_close(got, want, rtol=0, atol=_atol(engine, want))
    assert list(graphs.graphs) == [(4, engine.kv_cache.max_model_len, True)]


def test_bf16_engine_tracks_fp32(family: str) -> None:
    """bf16, the GPU default, through the paths a GPU takes (no packed linears, SDPA or the soft-capped
    matmul path in bf16, bf16 KV cache) and through the static decode body, against the fp32 engine."""
    ref, _ = family_engine(family)
    half, _ = family_engine(family, dtype=torch.bfloat16)
    graphs = DecodeGraphs(half.runner, 4, half.kv_cache.max_model_len, capture=False)
    seqs_ref, seqs_half = (_allocated(e, [21, 5, 12], [0, 0, 0]) for e in (ref, half))
    with torch.inference_mode():
        _advance(seqs_ref, ref.runner.prefill(seqs_ref))
        half.runner.prefill(seqs_half)
        for a, b in zip(seqs_ref, seqs_half, strict=True):  # the same next input, whatever bf16 chose
            b.num_cached = len(b)
            b.append_token(a.last_token)
        want = ref.runner.decode(seqs_ref)
        for got in (half.runner.decode(seqs_half), graphs.logits(seqs_half)):
            assert got.dtype == torch.float32
            err = float((got - want).norm() / want.norm())
            assert err < 0.1, err  # bf16 rounding: 0.013-0.033 measured on these tiny models


@pytest.mark.parametrize("T", [1, 5])  # decode (the additive-bias path) and prefill (the bool-mask path)
def test_softcapped_window_attention_matches_hf_eager(T: int) -> None:
    """attend + attention_mask with a soft-cap and a sliding window equal Gemma2's own eager attention
    under HF's sliding-window mask, GQA folded into the query axis as the runner does."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    torch.manual_seed(0)
    B, H, Hkv, hd, span, window, cap = 3, 4, 2, 8, 14, 4, 2.0
    G = H // Hkv
    q, k, v = torch.randn(B, H, T, hd) * 3, torch.randn(B, Hkv, span, hd) * 3, torch.randn(B, Hkv, span, hd)
    positions = torch.tensor([[13], [6], [9]]) - T + 1 + torch.arange(T)  # rows end at 13, 6 and 9
    mask = attention_mask(positions, span, G, window)
    bias = decode_bias(mask, torch.float32) if T == 1 else None
    got = attend(q.reshape(B, Hkv, G * T, hd), k, v, mask, bias, 0.3, cap).view(B, H, T, hd)
    j, p = torch.arange(span).view(1, 1, span), positions.unsqueeze(-1)
    allowed = ((j <= p) & (j > p - window)).unsqueeze(1)  # [B, 1, T, span]: HF's sliding-window mask
    additive = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    module = SimpleNamespace(num_key_value_groups=G, training=False, head_dim=hd)
    want, _ = eager_attention_forward(module, q, k, v, additive, scaling=0.3, softcap=cap)
    # A score sums hd products of size 0.3|q||k|; its error moves the output by up to that times |v|; the
    # output then sums `span` weighted values (tests/numerics.py).
    atol = reorder_atol(torch.float32, hd + span, 0.3 * float(q.abs().max() * k.abs().max() * v.abs().max()))
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=0, atol=atol)
    uncapped = attend(q.reshape(B, Hkv, G * T, hd), k, v, mask, bias, 0.3).view(B, H, T, hd)
    assert (uncapped - want.transpose(1, 2)).abs().max() > 0.1  # the cap matters at these magnitudes


def test_sliding_window_is_what_the_tokens_depend_on() -> None:
    """The window really acts in these tests: with it widened past every position, Mistral's tokens change."""
    prompt = _prompts([21])[0]
    narrow, wide = tiny_family_model("mistral"), tiny_family_model("mistral", sliding_window=None)
    assert oracle(narrow, prompt, 16) != oracle(wide, prompt, 16)


def test_unsupported_family_is_refused_with_the_supported_list() -> None:
    model = SimpleNamespace(config=SimpleNamespace(model_type="falcon"))
    with pytest.raises(ValueError, match="unsupported decoder 'falcon'") as info:
        decoder_for(model)
    for family in [*FAMILIES, "llama", "gpt2"]:
        assert repr(family) in str(info.value)
    assert set(DECODERS) == {*FAMILIES, "llama", "gpt2"}


def test_engine_refuses_an_unsupported_family_before_changing_the_model() -> None:
    config = transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, vocab_size=64)  # fmt: skip
    model = transformers.GPTNeoXForCausalLM(config)
    with pytest.raises(ValueError, match=r"unsupported decoder 'gpt_neox'; supported: \[.*'gemma2'.*'phi3'"):
        GeneratorEngine(model, byte_tokenizer(), None)
    assert not any(isinstance(m, MultiLoraLinear) for m in model.modules())  # no LoRA wrapping happened


def test_unservable_features_are_refused() -> None:
    with pytest.raises(ValueError, match="bidirectional"):
        decoder_for(tiny_family_model("gemma2", use_bidirectional_attention=True))


async def test_longrope_context_is_limited_to_its_original_length() -> None:
    """LongRoPE picks its frequencies by the longest position of a forward: beyond the original context a
    mixed batch would rotate its short rows wrongly, so the engine serves up to that context only, where
    it equals HF."""
    factors = [1.0, 1.3, 1.7, 2.0]  # head_dim 16, partial_rotary_factor 0.5: 8 rotated dims, one per pair
    rope = {"rope_type": "longrope", "short_factor": factors, "long_factor": [4 * f for f in factors],
            "partial_rotary_factor": 0.5}  # fmt: skip
    base = tiny_family_model("phi3", rope_scaling=rope, original_max_position_embeddings=32)
    info = describe_base(base, "tiny", "generation")
    engine = GeneratorEngine(
        copy.deepcopy(base), byte_tokenizer(), info, num_slots=2, max_rank=4, max_model_len=64
    )
    assert engine.max_model_len == 32 and engine.kv_cache.max_model_len == 32
    prompts = _prompts([5, 14])
    try:
        got = await asyncio.gather(*(collect(engine, p, greedy(16)) for p in prompts))
    finally:
        engine.shutdown()
    for prompt, (ids, _, _) in zip(prompts, got, strict=True):
        assert ids == oracle(base, prompt, 16)
