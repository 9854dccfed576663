"""Generation: reply-only loss masking, and a tiny decoder trained -> evaluated -> published end to end."""

from __future__ import annotations

import math

import pytest

from adapters.bases import load_base
from adapters.fingerprint import describe_base
from adapters.format import validate_adapter
from adapters.registry import Registry
from tests.training.helpers import (
    metrics_json,
    recipe,
    scalars,
    single_thread,  # noqa: F401  (autouse)
)
from training.cli import run
from training.data import load_splits, tokenize_generation
from training.recipe import load_recipe

SYSTEM = "You are a concise support agent."


@pytest.fixture(scope="module")
def tokenizer(tiny_decoder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_decoder)


def _prompt_ids(tokenizer, prompt: str, system: str | None) -> list[int]:
    """The chat prompt, rendered as text by the template and tokenized separately (independent of data.py)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("system", [None, SYSTEM])
def test_labels_mask_exactly_the_chat_prompt(tokenizer, bitext_slice, system):
    r = load_recipe(None, {"name": "gen", "task": "generation", "data": str(bitext_slice), "max_length": 1024,
                           "system_prompt": system})
    rows = load_splits(r).train.select(range(6))
    encoded = tokenize_generation(rows, tokenizer, r)
    for row, enc in zip(rows, encoded, strict=True):
        prompt = _prompt_ids(tokenizer, row["instruction"], system)
        n = len(prompt)
        ids, labels = enc["input_ids"], enc["labels"]
        assert len(ids) == len(labels) == len(enc["attention_mask"]) == enc["length"]
        assert ids[:n] == prompt
        assert labels[:n] == [-100] * n  # the whole prompt (system, user turn, assistant header) is masked
        assert len(labels) > n and -100 not in labels[n:]  # ... and nothing of the reply is
        assert labels[n:] == ids[n:]
        assert ids[-1] == tokenizer.eos_token_id  # the reply ends with end-of-turn: the model learns to stop
        assert tokenizer.decode(ids[n:], skip_special_tokens=True) == row["response"].strip()
        if system:
            assert SYSTEM in tokenizer.decode(ids[:n])


def test_truncation_keeps_labels_aligned(tokenizer, bitext_slice):
    r = load_recipe(None, {"name": "gen", "task": "generation", "data": str(bitext_slice),
                           "max_length": 1024})
    row = load_splits(r).train[0]
    n = len(_prompt_ids(tokenizer, row["instruction"], None))
    short = load_recipe(None, {**r.to_dict(), "max_length": n + 3})
    from datasets import Dataset

    enc = tokenize_generation(Dataset.from_list([row]), tokenizer, short)[0]
    assert len(enc["input_ids"]) == len(enc["labels"]) == n + 3
    assert enc["labels"][:n] == [-100] * n and enc["labels"][n:] == enc["input_ids"][n:]


def test_generation_run_is_published_with_loss_and_samples(tiny_decoder, tokenizer, bitext_slice, tmp_path):
    r = recipe(tiny_decoder, bitext_slice, tmp_path / "run", task="generation",
               registry=str(tmp_path / "reg"), max_steps=6, eval_steps=3, batch_size=8, eval_batch_size=16,
               max_length=96, learning_rate=1e-2, num_samples=2, max_new_tokens=4, system_prompt=SYSTEM)
    outcome = run(r, publish=True)
    assert outcome["published"] == "tiny@1"
    reg = Registry(tmp_path / "reg")
    folder = reg.fetch("tiny", 1)
    for rel in ("adapter_config.json", "adapter_model.safetensors", "loraswap.json", "eval/metrics.json",
                "eval/report.md"):
        assert (folder / rel).is_file(), rel

    base, _ = load_base(str(tiny_decoder), "generation")
    manifest = validate_adapter(folder, describe_base(base, str(tiny_decoder), "generation"))
    assert manifest.task == "generation" and manifest.labels is None and manifest.head is None
    assert manifest.dataset.rows == {"train": 64, "validation": 16, "test": 16}
    assert manifest.training["recipe"]["system_prompt"] == SYSTEM and manifest.training["steps"] == 6

    splits = metrics_json(folder)["splits"]
    for split in ("validation", "test"):
        m = splits[split]
        assert m["rows"] == 16
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-9)
        assert m["base_perplexity"] == pytest.approx(math.exp(m["base_loss"]), rel=1e-9)
        # A random base is near log(vocab); a few steps on the replies must already beat it.
        assert m["loss"] < m["base_loss"] <= math.log(len(tokenizer)) + 1.0
        assert m["loss_reduction"] == pytest.approx(1 - m["loss"] / m["base_loss"], rel=1e-9)
        for key in ("loss", "base_loss", "perplexity"):
            assert manifest.metrics[f"{split}_{key}"] == pytest.approx(m[key], rel=1e-5)
    samples = splits["test"]["samples"]  # sampled once, from the last held-out split
    assert len(samples) == 2 and "samples" not in splits["validation"]
    assert {"prompt", "reference", "reply", "base_reply"} <= set(samples[0])

    report = (folder / "eval" / "report.md").read_text()
    assert "## Sample replies" in report and "### 1." in report and "### 2." in report
    assert samples[0]["prompt"] in report and "| test | 16 |" in report
    tb = scalars(tmp_path / "run" / "tensorboard")
    assert [s for s, _ in tb["eval/loss"]][:2] == [3, 6] and tb["train/loss"] and tb["train/learning_rate"]

