"""Tests for service/engine/quantize.py (int8 and int4 base linears) and precision.py (the `auto` choice).

Oracle for int8: PEFT on the same int8 base (its base layers swapped for the same Int8Linear kernel).
Activations are quantized per call over the whole input, so only a batch PEFT sees identically (one
adapter for every row) is compared; the tolerance (5e-3) allows PEFT's and our LoRA sums, which differ in
the last bits, to move an activation across one int8 rounding step.
"""

from __future__ import annotations

import pytest
import torch
from factories import randomize_peft
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from service.config import Settings
from service.engine import quantize
from service.engine.lora_model import inject_multi_lora, matches_target
from service.engine.precision import choose
from service.engine.quantize import (
    INT4_GROUP,
    LOSSLESS,
    Int4Linear,
    Int8Linear,
    can_quantize,
    prepare_block_linears,
    quantize_block_linears,
)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_int8_linear_is_the_dequantized_linear(kind: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(64, 48) if kind == "linear" else Conv1D(48, 64)
    q = Int8Linear(base)
    x = torch.randn(5, 64)
    weight = base.weight.t() if kind == "conv1d" else base.weight
    with torch.no_grad():
        want = nn.functional.linear(x, weight, base.bias)
        got = q(x)
        # int8 weights (per row) and activations (per call, 7 bits on fbgemm): ~1 % of the output's range
        assert (got - want).abs().max() < 0.02 * want.abs().max()
        assert (q.dequantized() - weight).abs().max() <= weight.abs().amax(1).max() / 127 / 2 + 1e-6
    assert q.nbytes == 64 * 48 + 4 * 48
    assert not can_quantize(q) and not can_quantize(nn.Linear(4, 4).to(torch.bfloat16))


def _tiny_llama() -> nn.Module:
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def test_int8_engine_base_matches_peft_on_the_same_int8_base() -> None:
    torch.manual_seed(1)
    base = _tiny_llama()
    state = base.state_dict()
    oracle = _tiny_llama()
    oracle.load_state_dict(state)
    peft_model = get_peft_model(oracle, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).eval()
    randomize_peft(peft_model, 0.2)
    lora = {}
    for path, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            lora[path.removeprefix("base_model.model.")] = (module.lora_A["default"].weight, module.lora_B["default"].weight)
    for path, module in list(peft_model.named_modules()):  # the same int8 base under PEFT
        if "lora_" not in path and matches_target(path, None) and can_quantize(module):
            parent, _, name = path.rpartition(".")
            setattr(peft_model.get_submodule(parent), name, Int8Linear(module))

    from adapters.peft import LoraModule

    slots = inject_multi_lora(base, None, num_slots=2, max_rank=8)
    slots.load(1, {p: LoraModule(A.detach(), B.detach(), 2.0) for p, (A, B) in lora.items()})
    assert quantize_block_linears(base) == 14  # 7 per layer, the LoRA bases; lm_head stays fp32
    assert isinstance(base.lm_head, nn.Linear)
    ids = torch.randint(1, 100, (3, 9))
    with torch.no_grad(), slots.use(torch.ones(3, dtype=torch.long)):
        got = base(input_ids=ids).logits
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize(
    "device, task, dtype, quant, want",
    [
        # auto on a CPU: int4 where the weights already are 4-bit and it measures faster (decided by the
        # engine at start, test_int4_lossless_*); an explicit dtype or quantization wins
        ("cpu", "generation", "auto", "auto", (torch.float32, "int4-lossless")),
        ("cpu", "classification", "auto", "auto", (torch.float32, "int4-lossless")),
        ("cpu", "generation", "bfloat16", "auto", (torch.bfloat16, "none")),
        ("cpu", "generation", "auto", "int8", (torch.float32, "int8")),
        ("cpu", "generation", "auto", "int4", (torch.float32, "int4")),
        ("cpu", "generation", "float32", "auto", (torch.float32, "none")),
        ("cpu", "generation", "auto", "none", (torch.float32, "none")),
        ("cuda", "generation", "auto", "auto", (torch.bfloat16, "none")),
        ("cpu", "classification", "float16", "none", (torch.float16, "none")),
    ],
)
def test_auto_choice(device, task, dtype, quant, want) -> None:
    chosen = choose(device, task, dtype, quant)
    assert (chosen.dtype, chosen.quantization) == want
    assert chosen.reason and str(chosen)  # what start-up logs


def test_bad_combinations_are_refused() -> None:
    with pytest.raises(ValueError, match="CPU only"):
        choose("cuda", "generation", "auto", "int8")
    with pytest.raises(ValueError, match="float32"):
        choose("cpu", "generation", "bfloat16", "int8")
    with pytest.raises(ValueError, match="CPU only"):
        choose("cuda", "generation", "auto", "int4")


def test_quantization_setting_from_env(monkeypatch) -> None:
    monkeypatch.setenv("LORASWAP_QUANTIZATION", "int8")
    monkeypatch.setenv("LORASWAP_DEVICE", "cpu")
    s = Settings()
    assert s.quantization == "int8"
    assert s.resolved_precision("classification").quantization == "int8"
    monkeypatch.setenv("LORASWAP_QUANTIZATION", "int3")
    with pytest.raises(ValueError):
        Settings()


def _on_4bit_grid(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """Weights as a Q4_1 GGUF holds them: per group of 32 along the input, q * d + m with q in 0..15, where
    d = (max - min) / 15 and m = min, so each group holds a 0 and a 15 (its min and its max)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_features, in_features // INT4_GROUP, INT4_GROUP), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    d = 0.01 + 0.01 * torch.rand(out_features, in_features // INT4_GROUP, 1, generator=g)
    m = -8 * d + 0.002 * torch.randn(out_features, in_features // INT4_GROUP, 1, generator=g)
    return (q * d + m).reshape(out_features, in_features)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])  # Llama-style nn.Linear, GPT-2's Conv1D ([in, out])
def test_int4_linear_on_4bit_weights_is_the_linear_up_to_bf16(kind: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(128, 48) if kind == "linear" else Conv1D(48, 128)
    grid = _on_4bit_grid(48, 128)
    with torch.no_grad():
        base.weight.copy_(grid if kind == "linear" else grid.t())
    q = Int4Linear(base)
    assert q.error <= LOSSLESS  # back on its grid: only the bf16 scale/offset rounding is lost
    x = torch.randn(5, 3, 128)
    with torch.no_grad():
        want = nn.functional.linear(x, grid, base.bias)
        got = q(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    # x and the group scale/offset are rounded to bf16 (relative 2^-8 each); sums of 128 products of
    # independent errors grow like sqrt(128): bound at 2^-8 * sqrt(128) * max|x| * max|w| * 4.
    bound = 2.0**-8 * 128**0.5 * float(x.abs().max() * grid.abs().max()) * 4
    assert (got - want).abs().max() < bound
    assert q.nbytes < base.weight.numel() * 4 / 5  # ~1/8 of fp32 plus the group scales


def _timed(int4_ms: float, fp32_ms: float):
    """A stand-in for quantize.one_row_ms: the start-up timing decides, so tests fix its outcome."""
    return lambda modules, repeats=5: int4_ms if isinstance(modules[0], Int4Linear) else fp32_ms


def test_int4_lossless_takes_only_weights_already_on_the_grid(monkeypatch) -> None:
    monkeypatch.setattr(quantize, "one_row_ms", _timed(1.0, 2.0))
    torch.manual_seed(0)
    model = _tiny_llama()
    layer0 = model.model.layers[0]
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(layer0.self_attn, name)
            lin.weight.copy_(_on_4bit_grid(*lin.weight.shape, seed=len(name)))
    summary = prepare_block_linears(model, "int4-lossless")
    assert summary.startswith("4 block linears int4")  # layer 0's attention; its normal-random MLP is not
    assert isinstance(layer0.self_attn.q_proj, Int4Linear) and not isinstance(layer0.mlp.up_proj, Int4Linear)
    assert Int4Linear(nn.Linear(64, 32)).error > 10 * LOSSLESS  # random fp32 weights: far off any grid
    every = _tiny_llama()
    assert prepare_block_linears(every, "int4").startswith("14 block linears int4")  # asked for: all of them


def test_int4_lossless_needs_int4_to_measure_faster(monkeypatch) -> None:
    model = _tiny_llama()
    with torch.no_grad():
        for path, module in model.named_modules():
            if matches_target(path, None) and isinstance(module, nn.Linear):
                module.weight.copy_(_on_4bit_grid(*module.weight.shape))
    monkeypatch.setattr(quantize, "one_row_ms", _timed(1.91, 2.0))  # under 10 % faster: not worth it
    summary = prepare_block_linears(model, "int4-lossless")
    assert summary == "0 block linears int4, 14 fp32 packed (one row through those 14: int4 1.91 ms, fp32 2.00 ms)"
    assert not any(isinstance(m, Int4Linear) for m in model.modules())
    torch.manual_seed(0)
    ids = torch.randint(1, 100, (2, 5))
    with torch.no_grad():
        model(input_ids=ids)  # the packed fp32 linears serve
    real = quantize.one_row_ms([Int4Linear(nn.Linear(64, 32))], repeats=1)  # the real timer runs
    assert real > 0


def test_int4_engine_base_matches_peft_on_the_same_weights(monkeypatch) -> None:
    """Weights on a 4-bit grid (as the embedded SmolLM2): the int4 engine base with a LoRA slot against
    PEFT on the fp32 base. Only bf16 rounding differs (activations into the kernel, group scales)."""
    torch.manual_seed(1)
    base = _tiny_llama()
    with torch.no_grad():
        for path, module in base.named_modules():
            if matches_target(path, None) and isinstance(module, nn.Linear):
                module.weight.copy_(_on_4bit_grid(*module.weight.shape, seed=len(path)))
    oracle = _tiny_llama()
    oracle.load_state_dict(base.state_dict())
    peft_model = get_peft_model(oracle, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).eval()
    randomize_peft(peft_model, 0.2)
    from adapters.peft import LoraModule

    lora = {path.removeprefix("base_model.model."): LoraModule(m.lora_A["default"].weight.detach(),
                                                              m.lora_B["default"].weight.detach(), 2.0)
            for path, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}  # fmt: skip
    slots = inject_multi_lora(base, None, num_slots=2, max_rank=8)
    slots.load(1, lora)
    monkeypatch.setattr(quantize, "one_row_ms", _timed(1.0, 2.0))
    assert prepare_block_linears(base, "int4-lossless").startswith("14 block linears int4")
    ids = torch.randint(1, 100, (3, 9))
    with torch.no_grad(), slots.use(torch.ones(3, dtype=torch.long)):
        got = base(input_ids=ids).logits
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    # bf16 rounding (2^-8 relative) of every linear's input, through 2 layers: ~1 % of the logits' scale
    torch.testing.assert_close(got, want, atol=0.02 * float(want.abs().max()), rtol=0)
    assert not torch.equal(got, want)  # the int4 kernel did run (bf16 leaves its mark)
