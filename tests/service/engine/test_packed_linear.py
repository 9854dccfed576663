"""Tests for service/engine/packed_linear.py: oneDNN-packed linears equal the modules they replace, and
packing touches exactly the linears inside the transformer blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from service.engine.lora_model import inject_multi_lora
from service.engine.packed_linear import PackedLinear, can_pack, pack_block_linears

pytestmark = pytest.mark.skipif(not can_pack(nn.Linear(2, 2)), reason="this torch has no oneDNN linear ops")


@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "conv1d"])
@pytest.mark.parametrize("shape", [(1,), (16,), (3, 7), (2, 5)])  # [N, in] and [B, T, in]
def test_packed_equals_module(kind: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    base = {"linear": nn.Linear(48, 40), "linear_nobias": nn.Linear(48, 40, bias=False), "conv1d": Conv1D(40, 48)}[
        kind
    ]
    if base.bias is not None:
        nn.init.normal_(base.bias)
    packed = PackedLinear(base)
    assert (packed.in_features, packed.out_features) == (48, 40)
    x = torch.randn(*shape, 48)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), base(x), atol=1e-5, rtol=1e-5)
        # a non-contiguous input (a transposed view) gives the same result
        xt = torch.randn(*reversed(shape), 48).transpose(0, -2) if len(shape) == 2 else x
        torch.testing.assert_close(packed(xt), base(xt.contiguous()), atol=1e-5, rtol=1e-5)


def test_can_pack_only_plain_fp32_cpu_linears() -> None:
    assert can_pack(nn.Linear(4, 4)) and can_pack(Conv1D(4, 4))
    assert not can_pack(nn.Linear(4, 4).to(torch.bfloat16))
    assert not can_pack(nn.Embedding(4, 4))
    assert not can_pack(PackedLinear(nn.Linear(4, 4)))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pack_block_linears_scope_and_outputs(family: str) -> None:
    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
        model, per_layer = LlamaForCausalLM(cfg).eval(), 7
    else:
        cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)
        model, per_layer = GPT2LMHeadModel(cfg).eval(), 4
    ids = torch.randint(0, 100, (3, 9))
    with torch.inference_mode():
        want = model(input_ids=ids).logits
    inject_multi_lora(model, None, num_slots=2, max_rank=4)
    params_before = sum(p.numel() for p in model.parameters())
    assert pack_block_linears(model) == 2 * per_layer
    # every block linear is packed (the LoRA bases included); the lm_head and embeddings are not
    assert isinstance(model.lm_head, nn.Linear)
    packed = [path for path, m in model.named_modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 2 * per_layer and all(path.endswith(".base") for path in packed)
    # the dense copies are gone: packing does not hold the weights twice
    dense_block = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, PackedLinear))
    assert sum(p.numel() for p in model.parameters()) <= params_before - dense_block
    assert pack_block_linears(model) == 0  # idempotent
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)
