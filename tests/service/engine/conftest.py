"""Fixtures for the engine tests: a tiny BERT classification base (with a word-level tokenizer) saved to
disk, and real PEFT SEQ_CLS adapters trained on nothing but with randomised LoRA weights, saved with PEFT.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from factories import randomize_adapter
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
)

from adapters.peft import WEIGHTS_FILE, default_scale, lora_modules, read_config, split_tensors

WORDS = [f"w{i}" for i in range(95)]


def tiny_bert_config(num_labels: int = 2) -> BertConfig:
    return BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=num_labels,
        max_position_embeddings=128,
    )


def random_text(rng: random.Random, max_words: int = 20) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved BertForSequenceClassification (2 labels, with pooler) plus a word-level tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config()).save_pretrained(folder)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    return folder


def load_base(folder: Path, **kwargs) -> torch.nn.Module:
    return AutoModelForSequenceClassification.from_pretrained(folder, **kwargs).eval()


# (rank, alpha, targets, labels, modules_to_save extra): ≥ 8 mixes of ranks, targets and label counts.
ADAPTER_SPECS = [
    (2, 4, ["query", "value"], 2, []),
    (8, 16, ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"], 5, []),
    (4, 8, ["intermediate.dense"], 3, ["pooler"]),
    (1, 1, ["key"], 7, []),
    (16, 8, ["query", "value", "output.dense"], 2, ["pooler"]),
    (3, 9, ["attention.output.dense"], 4, []),
    (6, 6, ["query", "key"], 9, []),
    (5, 20, ["value", "intermediate.dense"], 6, []),
    (
        8,
        3,
        ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
        3,
        ["pooler"],
    ),
]


def make_peft_adapter(base_dir: Path, out_dir: Path, spec: tuple, seed: int) -> torch.nn.Module:
    """Save a PEFT SEQ_CLS adapter for `spec` to out_dir; returns the PEFT model (the oracle)."""
    r, alpha, targets, labels, extra = spec
    torch.manual_seed(seed)
    model = load_base(base_dir, num_labels=labels, ignore_mismatched_sizes=True)
    cfg = LoraConfig(
        task_type="SEQ_CLS", r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
        modules_to_save=extra or None,
    )  # fmt: skip
    peft_model = get_peft_model(model, cfg).eval()
    randomize_adapter(peft_model, 0.3, ("lora_", "modules_to_save"))  # every trained tensor
    peft_model.save_pretrained(out_dir)
    return peft_model


def read_peft_folder(folder: Path, labels: int) -> SimpleNamespace:
    """AdapterWeights' fields of a plain PEFT folder (no manifest), read by the service's own PEFT rules."""
    cfg = read_config(folder)
    parts, head = split_tensors(load_file(folder / WEIGHTS_FILE), cfg)
    return SimpleNamespace(
        scale=default_scale(cfg),
        lora=lora_modules(parts, cfg, None, max_rank=64),
        head=head,
        manifest=SimpleNamespace(labels=[f"l{i}" for i in range(labels)]),
    )


@pytest.fixture(scope="session")
def peft_adapters(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[tuple]:
    """[(peft_model, AdapterWeights-like, labels)] for every ADAPTER_SPECS entry, saved and read back."""
    root = tmp_path_factory.mktemp("adapters")
    out = []
    for i, spec in enumerate(ADAPTER_SPECS):
        folder = root / f"a{i}"
        peft_model = make_peft_adapter(tiny_base_dir, folder, spec, seed=100 + i)
        out.append((peft_model, read_peft_folder(folder, spec[3]), spec[3]))
    return out


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """The helpers above for test modules (importing `conftest` by name is ambiguous under pytest)."""
    return SimpleNamespace(
        ADAPTER_SPECS=ADAPTER_SPECS,
        load_base=load_base,
        random_text=random_text,
        read_peft_folder=read_peft_folder,
    )
