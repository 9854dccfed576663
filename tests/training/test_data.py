"""Data loading: formats, column mapping, automatic split, and one clear error per bad input."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from adapters.errors import LoraswapError
from tests.training.conftest import write_jsonl
from training.data import load_splits, longest_first, read_table
from training.recipe import load_recipe


def _recipe(data, **kw):
    return load_recipe(None, {"name": "t", "data": str(data), **kw})


def _rows(n: int, labels=("neg", "pos")) -> list[dict]:
    return [{"text": f"row number {i}", "label": labels[i % len(labels)]} for i in range(n)]


def test_jsonl_folder_with_all_splits(sst2_slice):
    splits = load_splits(_recipe(sst2_slice))
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (200, 60, 60)
    assert splits.labels == ["negative", "positive"]  # labels.json order
    assert not splits.validation_is_auto
    assert splits.info["rows"] == {"train": 200, "validation": 60, "test": 60}
    assert len(splits.info["sha256"]) == 64


def test_csv_and_parquet_with_column_mapping(tmp_path):
    import pandas as pd

    rows = [{"sentence": r["text"], "y": r["label"]} for r in _rows(40)]
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(rows[:10]).to_parquet(tmp_path / "validation.parquet")
    splits = load_splits(_recipe(tmp_path, text_column="sentence", label_column="y"))
    assert len(splits.train) == 40 and len(splits.validation) == 10
    assert splits.labels == ["neg", "pos"]


def test_integer_csv_labels_become_names(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"t{i},{i % 3}\n" for i in range(30)))
    splits = load_splits(_recipe(tmp_path / "train.csv"))
    assert splits.labels == ["0", "1", "2"]


def test_automatic_split_is_stratified(tmp_path):
    rows = _rows(300, labels=("a", "b", "b", "c", "c", "c"))
    write_jsonl(tmp_path / "train.jsonl", rows)
    splits = load_splits(_recipe(tmp_path, val_fraction=0.2))
    assert splits.validation_is_auto
    assert len(splits.train) + len(splits.validation) == 300
    assert Counter(splits.validation["label"]) == {"a": 10, "b": 20, "c": 30}
    assert not set(splits.train["text"]) & set(splits.validation["text"])


def test_missing_column_names_file_and_line(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"sentence": "x", "label": "a"}] * 5)
    with pytest.raises(LoraswapError, match=r"train\.jsonl:1: missing column 'text'"):
        load_splits(_recipe(tmp_path))


def test_missing_value_in_one_row_names_its_line(tmp_path):
    rows = _rows(10)
    rows[6] = {"text": "no label here"}
    write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(LoraswapError, match=r"train\.jsonl:7: missing or empty value for column 'label'"):
        load_splits(_recipe(tmp_path))


def test_missing_column_in_csv_header(tmp_path):
    (tmp_path / "train.csv").write_text("sentence,label\nhello,a\n")
    with pytest.raises(LoraswapError, match=r"train\.csv:1: missing column 'text'"):
        load_splits(_recipe(tmp_path))


@pytest.mark.parametrize("content", [b"", b"text,label\n"])
def test_empty_file(tmp_path, content):
    (tmp_path / "train.csv").write_bytes(content)
    with pytest.raises(LoraswapError, match=r"train\.csv: the file (is empty|has no data rows)"):
        load_splits(_recipe(tmp_path))


def test_empty_jsonl(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(LoraswapError, match=r"train\.jsonl: the file is empty"):
        load_splits(_recipe(tmp_path))


@pytest.mark.parametrize("split", ["validation", "test"])
def test_label_not_seen_in_training(tmp_path, split):
    write_jsonl(tmp_path / "train.jsonl", _rows(20))
    held = _rows(5)
    held[3] = {"text": "surprise", "label": "neutral"}
    write_jsonl(tmp_path / f"{split}.jsonl", held)
    with pytest.raises(LoraswapError, match=rf"{split}\.jsonl:4: label 'neutral' does not occur in the training"):
        load_splits(_recipe(tmp_path))


def test_non_utf8_file_names_line(tmp_path):
    lines = [json.dumps(r) for r in _rows(5)]
    data = ("\n".join(lines[:2]) + "\n").encode() + '{"text": "caf\xe9", "label": "neg"}\n'.encode("latin-1")
    (tmp_path / "train.jsonl").write_bytes(data)
    with pytest.raises(LoraswapError, match=r"train\.jsonl:3: not valid UTF-8"):
        load_splits(_recipe(tmp_path))


def test_invalid_json_line(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": oops}\n')
    with pytest.raises(LoraswapError, match=r"train\.jsonl:2: invalid JSON"):
        read_table(tmp_path / "train.jsonl", ["text", "label"])


def test_missing_folder_and_unknown_format(tmp_path):
    with pytest.raises(LoraswapError, match="no such data folder"):
        load_splits(_recipe(tmp_path / "nope"))
    (tmp_path / "train.txt").write_text("x")
    with pytest.raises(LoraswapError, match="unsupported format"):
        read_table(tmp_path / "train.txt", ["text"])


def test_generation_columns(bitext_slice):
    splits = load_splits(_recipe(bitext_slice, task="generation"))
    assert splits.labels is None and len(splits.train) == 64
    with pytest.raises(LoraswapError, match="missing column 'prompt'"):
        load_splits(_recipe(bitext_slice, task="generation", prompt_column="prompt"))


def test_longest_first_sorts_evaluation_rows_and_keeps_every_row():
    from datasets import Dataset

    rows = Dataset.from_dict({"input_ids": [[1] * n for n in (3, 9, 1, 9, 5)], "length": [3, 9, 1, 9, 5],
                              "labels": [0, 1, 2, 3, 4]})
    ordered = longest_first(rows)
    assert ordered["length"] == [9, 9, 5, 3, 1]
    assert sorted(ordered["labels"]) == [0, 1, 2, 3, 4]
    assert [len(ids) for ids in ordered["input_ids"]] == ordered["length"]
