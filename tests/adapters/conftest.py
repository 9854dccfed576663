"""Tiny in-process bases and PEFT adapters for the adapter-contract tests (no downloads)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

TINY_BERT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
)


def make_bert_config(**over):
    from transformers import BertConfig

    return BertConfig(**{**TINY_BERT, **over})


def save_tiny_base(folder: Path, seed: int = 0) -> Path:
    """A tiny BERT saved with save_pretrained (+ a word-piece vocab so a tokenizer loads too)."""
    from transformers import BertModel, BertTokenizerFast

    torch.manual_seed(seed)
    BertModel(make_bert_config()).save_pretrained(folder)
    vocab = folder / "vocab.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
    vocab.write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    return folder


def load_cls(folder: Path, num_labels: int = 3):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels).eval()


def save_peft_adapter(
    base_folder: Path, out: Path, num_labels: int = 3, seed: int = 1, **lora_kwargs
) -> dict:
    """Train-free PEFT LoRA (SEQ_CLS) on the tiny base, with non-zero B; returns its saved state dict."""
    from peft import LoraConfig, TaskType, get_peft_model
    from peft.utils import get_peft_model_state_dict

    model = load_cls(base_folder, num_labels)
    options = dict(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"])
    options.update(lora_kwargs)
    peft_model = get_peft_model(model, LoraConfig(**options))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    peft_model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_folder)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}


@pytest.fixture(scope="session")
def helpers():
    """The helper functions above, for test modules (tests/ is not a package, so no relative import)."""
    import types

    return types.SimpleNamespace(
        make_bert_config=make_bert_config,
        save_tiny_base=save_tiny_base,
        load_cls=load_cls,
        save_peft_adapter=save_peft_adapter,
    )


@pytest.fixture(scope="session")
def base_folder(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="session")
def other_base_folder(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("other-base"), seed=7)


@pytest.fixture(scope="session")
def base_info(base_folder):
    from adapters.fingerprint import describe_base

    return describe_base(load_cls(base_folder), str(base_folder), "classification")


@pytest.fixture(scope="session")
def _peft_template(tmp_path_factory, base_folder):
    out = tmp_path_factory.mktemp("peft") / "adapter"
    state = save_peft_adapter(base_folder, out)
    return out, state


@pytest.fixture
def peft_dir(tmp_path, _peft_template) -> Path:
    """A fresh copy of a plain PEFT LoRA folder (no manifest)."""
    dst = tmp_path / "peft"
    shutil.copytree(_peft_template[0], dst)
    return dst


@pytest.fixture
def peft_state(_peft_template) -> dict:
    return _peft_template[1]


@pytest.fixture
def adapter_dir(peft_dir, base_info) -> Path:
    """The PEFT folder imported: manifest written, ready to validate/publish."""
    from adapters.format import import_peft_folder

    import_peft_folder(peft_dir, "sentiment", base_info.name, base_info)
    return peft_dir
