"""The training loop itself: resuming from a checkpoint, seed control, and BitFit."""

from __future__ import annotations

import math

import pytest
import torch

from adapters.bases import load_base
from adapters.errors import LoraswapError
from tests.training.helpers import (
    adapter_tensors,
    metrics_json,
    recipe,
    scalars,
    single_thread,  # noqa: F401  (autouse)
)
from training.cli import run
from training.train import BITFIT_FILE, build, train


def _steps(history: list[dict], key: str) -> list[int]:
    return [h["step"] for h in history if key in h]


def test_resume_continues_from_the_last_checkpoint(tiny_encoder, sst2_slice, tmp_path):
    run_dir = tmp_path / "run"
    first = train(recipe(tiny_encoder, sst2_slice, run_dir, max_steps=8, eval_steps=4))
    assert first.trainer.state.global_step == 8
    assert (run_dir / "checkpoint-4").is_dir() and (run_dir / "checkpoint-8").is_dir()
    first_losses = {h["step"]: h["loss"] for h in first.history if "loss" in h}
    events_before = set((run_dir / "tensorboard").iterdir())

    second = train(recipe(tiny_encoder, sst2_slice, run_dir, max_steps=12, eval_steps=4, resume=True))
    state = second.trainer.state
    assert state.global_step == 12 and (run_dir / "checkpoint-12").is_dir()
    # The history comes back from checkpoint-8: the earlier steps are there once, with their values ...
    assert _steps(second.history, "loss") == [1, 2, 4, 6, 8, 10, 12]
    assert _steps(second.history, "eval_accuracy") == [4, 8, 12]
    assert {h["step"]: h["loss"] for h in second.history if "loss" in h and h["step"] <= 8} == first_losses
    # ... and only steps 9-12 ran again: the second run's own TensorBoard file starts after step 8.
    new_events = set((run_dir / "tensorboard").iterdir()) - events_before
    assert len(new_events) == 1, "the resumed run must write its own TensorBoard event file"
    resumed = scalars(new_events.pop())  # that file alone (a folder read would purge a restart's overlap)
    assert [s for s, _ in resumed["train/loss"]] == [10, 12]
    assert [s for s, _ in resumed["eval/accuracy"]][:1] == [12]
    assert (second.adapter_dir / "adapter_model.safetensors").is_file()


def test_resume_without_a_checkpoint_is_a_clear_error(tiny_encoder, sst2_slice, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraswapError, match=r"--resume: no checkpoint in .*empty"):
        train(recipe(tiny_encoder, sst2_slice, tmp_path / "empty", resume=True))
    with pytest.raises(LoraswapError, match="no checkpoint"):
        train(recipe(tiny_encoder, sst2_slice, tmp_path / "missing", resume=True))


def test_same_seed_same_weights_other_seed_other_weights(tiny_encoder, sst2_slice, tmp_path):
    def weights(name: str, seed: int) -> dict[str, torch.Tensor]:
        r = recipe(tiny_encoder, sst2_slice, tmp_path / name, seed=seed, max_steps=4, eval_steps=4)
        result = train(r)
        return adapter_tensors(result.adapter_dir)

    a, b, c = weights("a", 7), weights("b", 7), weights("c", 8)
    assert a.keys() == b.keys() == c.keys() and any("lora_A" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert not all(torch.equal(a[k], c[k]) for k in a)
    first_a = sorted(k for k in a if "lora_A" in k)[0]
    assert not torch.equal(a[first_a], c[first_a])  # a different LoRA init, not only another data order
    # Training moved the weights: lora_B starts at zero and must not be zero any more.
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_loss_is_a_mean_whatever_the_gradient_accumulation(tiny_encoder, sst2_slice, tmp_path, grad_accum):
    """16 rows per optimizer step either way: the logged loss stays a per-row mean (about ln 2 for a fresh
    2-way head), not a sum over micro-batches, and the gradient is not scaled up either."""
    r = recipe(tiny_encoder, sst2_slice, tmp_path, grad_accum=grad_accum, batch_size=16 // grad_accum,
               max_steps=2, eval_steps=2)
    result = train(r)
    first = next(h for h in result.history if "loss" in h)
    assert abs(first["loss"] - math.log(2)) < 0.1, first
    assert first["grad_norm"] < 0.5, first
    evals = [h["eval_loss"] for h in result.history if "eval_loss" in h]
    assert evals and abs(evals[0] - math.log(2)) < 0.1


def _bitfit_trainable_ok(name: str, trainable: bool, frozen_layers: int) -> bool:
    if name.startswith(("classifier.", "bert.pooler.")):
        return trainable  # the head trains in full
    if "embeddings" in name:
        return not trainable  # freeze_embeddings (default true)
    if any(f"encoder.layer.{i}." in name for i in range(frozen_layers)):
        return not trainable
    return trainable == name.endswith(".bias")


@pytest.mark.parametrize("freeze_layers", [0, 1])
def test_bitfit_trains_only_biases_and_the_head(tiny_encoder, sst2_slice, tmp_path, freeze_layers):
    model = build(recipe(tiny_encoder, sst2_slice, tmp_path, method="bitfit", freeze_layers=freeze_layers))[0]
    params = dict(model.named_parameters())
    wrong = [n for n, p in params.items() if not _bitfit_trainable_ok(n, p.requires_grad, freeze_layers)]
    assert not wrong, wrong
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert "classifier.weight" in trainable and "bert.encoder.layer.1.attention.self.query.bias" in trainable
    assert ("bert.encoder.layer.0.output.dense.bias" in trainable) == (freeze_layers == 0)
    assert not hasattr(model, "peft_config")  # no LoRA at all


def test_bitfit_run_is_not_published(tiny_encoder, sst2_slice, tmp_path):
    registry = tmp_path / "registry"
    r = recipe(tiny_encoder, sst2_slice, tmp_path / "run", method="bitfit", registry=str(registry))
    outcome = run(r, publish=True)
    assert outcome["published"] is None and "not published" in outcome["note"]
    assert not registry.exists() or not any(registry.rglob("loraswap.json"))
    assert metrics_json(tmp_path / "run")["splits"]["test"]["rows"] == 60

    from safetensors import safe_open
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "adapter" / BITFIT_FILE))
    with safe_open(str(tmp_path / "run" / "adapter" / BITFIT_FILE), "pt") as fh:
        assert fh.metadata() == {"method": "bitfit"}
    assert not (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
    assert all(k.endswith(".bias") or k.startswith(("classifier.", "bert.pooler.")) for k in saved)
    base = dict(load_base(str(tiny_encoder), "classification", num_labels=2)[0].named_parameters())
    key = "bert.encoder.layer.1.output.dense.bias"
    assert key in saved and not torch.equal(saved[key], base[key].detach())  # the biases really trained
    assert "bert.embeddings.LayerNorm.bias" not in saved
