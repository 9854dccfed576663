"""Training data: read CSV / JSONL / Parquet splits with `datasets`, check them, and tokenize them.

Every bad input becomes one LoraswapError naming the file and (for line-based files) the line, because
the person running `loraswap train` has to fix the file, not read a pyarrow traceback.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset

from adapters.errors import LoraswapError
from training.recipe import Recipe

_FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}


@dataclass
class Splits:
    train: Dataset
    validation: Dataset
    test: Dataset | None
    labels: list[str] | None  # classification: ordered; row i of the head = labels[i]
    files: dict[str, str]  # split -> path
    validation_is_auto: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # path, sha256, rows (for the manifest)


def _find_split(folder: Path, split: str) -> Path | None:
    for stem in _SPLIT_NAMES[split]:
        for ext in _FORMATS:
            if (folder / f"{stem}{ext}").is_file():
                return folder / f"{stem}{ext}"
    return None


def _line_of(path: Path, row: int) -> int:
    """1-based line of data row `row` (CSV has a header line first)."""
    return row + (2 if path.suffix == ".csv" else 1)


def _check_utf8(path: Path) -> None:
    if path.suffix == ".parquet":
        return  # binary; parquet strings are UTF-8 by specification
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise LoraswapError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start});"
            " re-save the file as UTF-8"
        ) from None


def read_table(path: str | Path, columns: list[str]) -> Dataset:
    """One file as a Dataset, with the given columns present and non-empty in every row."""
    path = Path(path)
    if not path.is_file():
        raise LoraswapError(f"{path}: no such file")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise LoraswapError(f"{path}: unsupported format (use .csv, .jsonl or .parquet)")
    if path.stat().st_size == 0:
        raise LoraswapError(f"{path}: the file is empty")
    _check_utf8(path)
    if fmt == "json":
        _check_jsonl(path)
    if fmt != "parquet" and sum(1 for line in path.open(encoding="utf-8") if line.strip()) <= (fmt == "csv"):
        raise LoraswapError(f"{path}: the file has no data rows")
    try:
        ds = Dataset.from_csv(str(path)) if fmt == "csv" else (
            Dataset.from_json(str(path)) if fmt == "json" else Dataset.from_parquet(str(path))
        )
    except Exception as exc:  # pyarrow/datasets raise many types; the user needs the file name
        raise LoraswapError(f"{path}: cannot read as {fmt}: {str(exc).splitlines()[0][:300]}") from None
    if len(ds) == 0:
        raise LoraswapError(f"{path}: the file has no data rows")
    for col in columns:
        if col not in ds.column_names:
            raise LoraswapError(
                f"{path}:1: missing column {col!r} (columns: {', '.join(ds.column_names)});"
                " map it with --text-column / --label-column"
            )
        for i, value in enumerate(ds[col]):
            if value is None or (isinstance(value, str) and not value.strip()):
                raise LoraswapError(f"{path}:{_line_of(path, i)}: missing or empty value for column {col!r}")
    return ds


def _check_jsonl(path: Path) -> None:
    """datasets reports a bad JSON line without its number; find it ourselves (cheap next to training)."""
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LoraswapError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise LoraswapError(f"{path}:{n}: expected a JSON object per line")


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def _stratified_split(ds: Dataset, column: str | None, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    from sklearn.model_selection import train_test_split

    idx = list(range(len(ds)))
    strat = ds[column] if column else None
    if strat is not None:
        # A class with one row cannot be on both sides; stratify only when every class has >= 2 rows.
        counts: dict[Any, int] = {}
        for v in strat:
            counts[v] = counts.get(v, 0) + 1
        if min(counts.values()) < 2 or int(len(ds) * fraction) < len(counts):
            strat = None
    tr, va = train_test_split(idx, test_size=fraction, random_state=seed, stratify=strat)
    return ds.select(sorted(tr)), ds.select(sorted(va))


def load_splits(recipe: Recipe) -> Splits:
    """Train/validation/(test) for the recipe, checked; labels ordered by labels.json when present."""
    folder = Path(recipe.data) if recipe.data else None
    files: dict[str, Path | None] = {"train": None, "validation": None, "test": None}
    if folder is not None and folder.is_file():
        files["train"] = folder
        folder = folder.parent
    elif folder is not None:
        if not folder.is_dir():
            raise LoraswapError(f"{folder}: no such data folder or file")
        for split in files:
            files[split] = _find_split(folder, split)
        if files["train"] is None:
            raise LoraswapError(f"{folder}: no train.csv / train.jsonl / train.parquet")
    for split, attr in (("train", "train_file"), ("validation", "validation_file"), ("test", "test_file")):
        if getattr(recipe, attr):
            files[split] = Path(getattr(recipe, attr))

    if recipe.task == "classification":
        columns = [recipe.text_column, recipe.label_column]
    elif recipe.task == "embedding":
        columns = _embedding_columns(files["train"], recipe)
    else:
        columns = [recipe.prompt_column, recipe.response_column]
    loaded = {s: read_table(p, columns) for s, p in files.items() if p is not None}
    labels: list[str] | None = None
    if recipe.task == "classification":
        # Labels are names: integer labels in a CSV become "0", "1", ... so every split compares equal.
        for split, ds in loaded.items():
            if ds.features[recipe.label_column].dtype != "string":
                loaded[split] = ds.cast_column(recipe.label_column, _string_feature())
    train = loaded["train"]
    if recipe.max_train_rows:
        train = train.shuffle(seed=recipe.seed).select(range(min(recipe.max_train_rows, len(train))))
    if recipe.task == "classification":
        # The full training file defines the label set, so a --max-train-rows slice keeps every head row.
        seen = set(loaded["train"][recipe.label_column])
        labels = _ordered_labels(folder, seen)
        for split in ("validation", "test"):
            ds = loaded.get(split)
            if ds is None:
                continue
            for i, label in enumerate(ds[recipe.label_column]):
                if label not in seen:
                    raise LoraswapError(
                        f"{files[split]}:{_line_of(files[split], i)}: label {label!r} does not occur in the"
                        f" training data {files['train']}"
                    )

    auto = "validation" not in loaded
    if auto:
        strat = recipe.label_column if recipe.label_column in columns else recipe.stratify_column
        train, validation = _stratified_split(train, strat, recipe.val_fraction, recipe.seed)
    else:
        validation = loaded["validation"]
    used = [p for p in files.values() if p is not None]
    info = {
        "path": str(folder if folder is not None else files["train"]),
        "sha256": _sha256(used),
        "rows": {"train": len(train), "validation": len(validation)}
        | ({"test": len(loaded["test"])} if "test" in loaded else {}),
    }
    return Splits(
        train=train,
        validation=validation,
        test=loaded.get("test"),
        labels=labels,
        files={k: str(v) for k, v in files.items() if v is not None},
        validation_is_auto=auto,
        info=info,
    )


def _embedding_columns(train: Path, recipe: Recipe) -> list[str]:
    """Pair columns when the training file has both, else labelled texts."""
    names = read_table(train, []).column_names
    if recipe.anchor_column in names and recipe.positive_column in names:
        return [recipe.anchor_column, recipe.positive_column]
    return [recipe.text_column, recipe.label_column]


def cap_rows(ds: Dataset, n: int | None, seed: int) -> Dataset:
    """A seeded sample of at most n rows (the same rows for the same data, n and seed)."""
    if not n or len(ds) <= n:
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def validation_rows(splits: Splits, recipe: Recipe) -> Dataset:
    """The validation rows used for model selection and the validation report (max_eval_rows caps them for
    speed); the test split is never capped."""
    return cap_rows(splits.validation, recipe.max_eval_rows, recipe.seed)


def _string_feature():
    from datasets import Value

    return Value("string")


def _ordered_labels(folder: Path | None, seen: set[str]) -> list[str]:
    """labels.json order when it covers the training labels (stable head rows across retrains), else sorted."""
    if folder is not None and (folder / "labels.json").is_file():
        listed = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
        if isinstance(listed, list) and seen <= set(map(str, listed)):
            return [str(x) for x in listed if str(x) in seen]
    return sorted(seen)


def tokenize_classification(ds: Dataset, tokenizer, recipe: Recipe, labels: list[str]) -> Dataset:
    """input_ids/attention_mask/labels (+ length for group_by_length); padding happens per batch."""
    label2id = {label: i for i, label in enumerate(labels)}

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(batch[recipe.text_column], truncation=True, max_length=recipe.max_length)
        enc["labels"] = [label2id[str(x)] for x in batch[recipe.label_column]]
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        return enc

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenize")


def longest_first(encoded: Dataset) -> Dataset:
    """Evaluation rows sorted by token count, so each batch pads to rows of about its own length. The
    Trainer length-groups evaluation batches itself only with `group_by_length` (the recipes' default);
    otherwise, as in `loraswap eval`, it evaluates in row order. For classification metrics, which do not
    depend on row order."""
    return encoded.sort("length", reverse=True)


def chat_prompt(tokenizer, prompt: str, system: str | None) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the assistant turn's header."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers v5 returns a BatchEncoding-like mapping for tokenize=True
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def tokenize_generation(ds: Dataset, tokenizer, recipe: Recipe) -> Dataset:
    """Chat-formatted prompt + reply; labels are -100 on the prompt so the loss covers the reply only."""
    eos = tokenizer.eos_token or ""

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        prompt_ids = chat_prompt(tokenizer, row[recipe.prompt_column], recipe.system_prompt)
        # The reply ends with the end-of-turn token so the model learns to stop.
        reply_ids = tokenizer(row[recipe.response_column].strip() + eos, add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + reply_ids)[: recipe.max_length]
        labels = ([-100] * len(prompt_ids) + reply_ids)[: recipe.max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "length": len(ids)}

    return ds.map(encode, remove_columns=ds.column_names, desc="tokenize")
