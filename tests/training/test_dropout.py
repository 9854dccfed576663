"""BulkDropout: the same Bernoulli(1 - p) mask and 1 / (1 - p) scaling as nn.Dropout, from torch's generator."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.training.helpers import recipe, single_thread  # noqa: F401  (autouse)
from training.dropout import BulkDropout, bulk_bernoulli_keep, use_bulk_dropout
from training.train import build

N = 1_000_000


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_keep_fraction_is_one_minus_p(p):
    torch.manual_seed(0)
    keep = bulk_bernoulli_keep(torch.Size([N]), p)
    assert keep.dtype == torch.bool and keep.shape == (N,)
    sigma = math.sqrt(p * (1 - p) / N)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma


def test_masks_are_uniform_across_the_four_words_of_a_draw():
    """Each int64 draw feeds four neighbouring elements: every position in a group of four is unbiased."""
    torch.manual_seed(1)
    keep = bulk_bernoulli_keep(torch.Size([N]), 0.5).view(-1, 4).float()
    sigma = math.sqrt(0.25 / (N / 4))
    for column in keep.unbind(1):
        assert abs(column.mean().item() - 0.5) < 5 * sigma
    # Neighbours are independent: both kept a quarter of the time.
    assert abs((keep[:, 0] * keep[:, 1]).mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / (N / 4))


def test_odd_shapes_and_seeds():
    torch.manual_seed(7)
    a = bulk_bernoulli_keep(torch.Size([3, 5, 7]), 0.3)  # 105 elements: not a multiple of four
    torch.manual_seed(7)
    b = bulk_bernoulli_keep(torch.Size([3, 5, 7]), 0.3)
    torch.manual_seed(8)
    c = bulk_bernoulli_keep(torch.Size([3, 5, 7]), 0.3)
    assert a.shape == (3, 5, 7) and torch.equal(a, b) and not torch.equal(a, c)


def test_forward_and_backward_match_dropout_semantics():
    torch.manual_seed(0)
    layer = BulkDropout(0.2).train()
    x = torch.randn(64, 33, 48, requires_grad=True)
    y = layer(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.8)
    assert abs(kept.float().mean().item() - 0.8) < 0.01
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.allclose(x.grad, torch.where(kept, grad / 0.8, 0.0))


def test_eval_mode_p0_and_p1():
    x = torch.randn(4, 8)
    assert BulkDropout(0.5).eval()(x) is x
    assert BulkDropout(0.0).train()(x) is x
    assert torch.equal(BulkDropout(1.0).train()(x), torch.zeros_like(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_uses_torch_dropout():
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, device="cuda")
    y = BulkDropout(0.1).train()(x)
    assert y.device.type == "cuda" and abs((y == 0).float().mean().item() - 0.1) < 0.005


def test_build_swaps_every_dropout_and_leaves_eval_outputs_alone(tiny_encoder, sst2_slice, tmp_path):
    model, tokenizer, *_ = build(recipe(tiny_encoder, sst2_slice, tmp_path / "run", lora_dropout=0.1))
    assert not any(type(m) is nn.Dropout for m in model.modules())
    lora = [m for n, m in model.named_modules() if ".lora_dropout." in n]
    assert lora and all(isinstance(m, BulkDropout) for m in lora)

    batch = tokenizer(["a fine film", "dull"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
        for module in list(model.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, BulkDropout):
                    setattr(module, child_name, nn.Dropout(child.p).eval())
        assert torch.equal(model(**batch).logits, before)
    # Swapping keeps each module's mode: an eval model stays deterministic.
    assert use_bulk_dropout(model) == len([m for m in model.modules() if isinstance(m, BulkDropout)]) > 0
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
