"""Tests for service/engine/quantize.py (int8 base linears) and precision.py (the `auto` choice).

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
from service.engine.lora_model import inject_multi_lora, matches_target
from service.engine.precision import choose
from service.engine.quantize import Int8Linear, can_quantize, quantize_block_linears

AVX2 = frozenset({"avx2", "fma"})
VNNI = AVX2 | {"avx512f", "avx512_vnni"}
AMX = VNNI | {"amx_bf16", "amx_int8", "amx_tile"}


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
    "device, task, dtype, quant, flags, want",
    [
        # AMX-BF16: bf16 is an opt-in until its accuracy is measured on such a CPU; auto stays fp32
        ("cpu", "generation", "auto", "auto", AMX, (torch.float32, "none")),
        ("cpu", "classification", "auto", "auto", AMX, (torch.float32, "none")),
        ("cpu", "generation", "bfloat16", "auto", AMX, (torch.bfloat16, "none")),
        ("cpu", "classification", "auto", "auto", VNNI, (torch.float32, "none")),
        ("cpu", "classification", "auto", "auto", AVX2, (torch.float32, "none")),
        ("cpu", "generation", "auto", "int8", AVX2, (torch.float32, "int8")),
        ("cpu", "generation", "float32", "auto", AMX, (torch.float32, "none")),  # an explicit dtype wins
        ("cpu", "generation", "auto", "none", AMX, (torch.float32, "none")),
        ("cuda", "generation", "auto", "auto", frozenset(), (torch.bfloat16, "none")),
        ("cpu", "classification", "float16", "none", AVX2, (torch.float16, "none")),
    ],
)
def test_auto_choice_by_capability(device, task, dtype, quant, flags, want) -> None:
    chosen = choose(device, task, dtype, quant, flags=flags)
    assert (chosen.dtype, chosen.quantization) == want
    assert chosen.reason and str(chosen)  # what start-up logs


def test_bad_combinations_are_refused() -> None:
    with pytest.raises(ValueError, match="CPU only"):
        choose("cuda", "generation", "auto", "int8")
    with pytest.raises(ValueError, match="float32"):
        choose("cpu", "generation", "bfloat16", "int8")


def test_quantization_setting_from_env(monkeypatch) -> None:
    monkeypatch.setenv("LORASWAP_QUANTIZATION", "int8")
    monkeypatch.setenv("LORASWAP_DEVICE", "cpu")
    s = Settings()
    assert s.quantization == "int8"
    assert s.resolved_precision("classification").quantization == "int8"
    monkeypatch.setenv("LORASWAP_QUANTIZATION", "int4")
    with pytest.raises(ValueError):
        Settings()
