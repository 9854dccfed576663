"""Tests for service/engine/sampling.py: greedy, top-k/top-p filtering, per-request seeds, parameter checks."""

from __future__ import annotations

import pytest
import torch

from service.engine.sampling import SamplingParams, make_generator, sample


def test_greedy_is_argmax() -> None:
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=0)] * 4
    assert sample(logits, params, [make_generator(0)] * 4) == logits.argmax(-1).tolist()


def test_top_k_1_and_tiny_top_p_pick_the_argmax() -> None:
    logits = torch.randn(3, 50)
    params = [SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(temperature=5.0, top_k=1)]
    gens = [make_generator(i) for i in range(3)]
    assert sample(logits, params, gens) == logits.argmax(-1).tolist()


def test_top_k_and_top_p_keep_only_the_allowed_tokens() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0]])
    gen = make_generator(0)
    top_k = {sample(logits, [SamplingParams(temperature=10.0, top_k=2)], [gen])[0] for _ in range(200)}
    assert top_k == {0, 1}
    # probs ~ [0.665, 0.245, 0.090, ...]: top_p 0.8 keeps the first two.
    top_p = {sample(logits, [SamplingParams(top_p=0.8)], [gen])[0] for _ in range(300)}
    assert top_p == {0, 1}


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.2])
    gen = make_generator(1)
    draws = [sample(probs.log().unsqueeze(0), [SamplingParams()], [gen])[0] for _ in range(3000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).float() / len(draws)
    torch.testing.assert_close(freq, probs, atol=0.04, rtol=0)


def test_seed_reproduces_regardless_of_batch_neighbours() -> None:
    logits = torch.randn(3, 100)
    p = SamplingParams(temperature=1.0, seed=42)
    alone = [sample(logits[1:2], [p], [make_generator(42)])[0] for _ in range(1)]
    gens = [make_generator(7), make_generator(42), make_generator(9)]
    mixed = sample(logits, [SamplingParams(), p, SamplingParams(temperature=0)], gens)
    assert mixed[1] == alone[0]


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2)])
def test_invalid_params_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_stop_accepts_a_single_string() -> None:
    assert SamplingParams(stop="END").stop == ["END"]
