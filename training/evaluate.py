"""Evaluate an adapter: classification metrics (scikit-learn) or generation loss/perplexity vs the base.

Runs after training (on the in-memory best model) and from `loraswap eval` (on a saved adapter folder).
Predictions go through `Trainer.predict`, so a distributed run gathers them across processes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from adapters.errors import LoraswapError
from training.data import (
    Splits,
    chat_prompt,
    longest_first,
    tokenize_classification,
    tokenize_generation,
    validation_rows,
)
from training.embedding import RETRIEVAL_KEYS, evaluate_retrieval
from training.recipe import Recipe
from training.train import collator


def classification_scores(y_true: list[int], y_pred: list[int], labels: list[str]) -> dict[str, Any]:
    """accuracy, macro-F1, per-class report and confusion matrix (rows = true label, cols = predicted)."""
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    ids = list(range(len(labels)))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "rows": len(y_true),
        "per_class": classification_report(
            y_true, y_pred, labels=ids, target_names=labels, output_dict=True, zero_division=0
        ),
        "report_text": classification_report(y_true, y_pred, labels=ids, target_names=labels, zero_division=0, digits=3),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    }


def _eval_trainer(model, tokenizer, recipe: Recipe, trainer: Trainer | None) -> Trainer:
    """Reuse the training Trainer (keeps DDP state); build a plain one for `loraswap eval`."""
    if trainer is not None:
        return trainer
    args = TrainingArguments(
        output_dir=str(recipe.run_dir / "eval-tmp"),
        per_device_eval_batch_size=recipe.eval_batch_size,
        report_to="none",
        label_names=["labels"],
        prediction_loss_only=recipe.task == "generation",
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, data_collator=collator(tokenizer, recipe.task), processing_class=tokenizer)
    if recipe.task == "classification":
        trainer.model_accepts_loss_kwargs = False  # a per-batch mean loss: see training.train.train
    return trainer


def predict_logits(model, tokenizer, recipe: Recipe, data: Dataset, labels: list[str],
                   trainer: Trainer | None = None):
    """(logits [n, labels], label ids [n], loss) for the rows, in longest-first order (not the data's)."""
    trainer = _eval_trainer(model, tokenizer, recipe, trainer)
    out = trainer.predict(longest_first(tokenize_classification(data, tokenizer, recipe, labels)))
    return np.asarray(out.predictions), np.asarray(out.label_ids), float(out.metrics.get("test_loss", float("nan")))


def evaluate_classification(model, tokenizer, recipe: Recipe, data: Dataset, labels: list[str],
                            trainer: Trainer | None = None) -> dict[str, Any]:
    logits, label_ids, loss = predict_logits(model, tokenizer, recipe, data, labels, trainer)
    scores = classification_scores(label_ids.tolist(), logits.argmax(-1).tolist(), labels)
    scores["loss"] = loss
    scores["logits"], scores["label_ids"] = logits, label_ids  # for calibration; not written to reports
    return scores


def _mean_loss(trainer: Trainer, encoded: Dataset) -> float:
    return float(trainer.evaluate(encoded, metric_key_prefix="eval")["eval_loss"])


def sample_replies(model, tokenizer, recipe: Recipe, rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Greedy replies from the adapter (and the base, for comparison) on held-out prompts."""
    samples = []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for row in rows:
        ids = torch.tensor([chat_prompt(tokenizer, row[recipe.prompt_column], recipe.system_prompt)], device=device)
        replies = {}
        for who in ("adapter", "base"):
            with torch.no_grad():
                if who == "base" and hasattr(model, "disable_adapter"):
                    with model.disable_adapter():
                        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                             max_new_tokens=recipe.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
                else:
                    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=recipe.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            replies[who] = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
        samples.append({"prompt": row[recipe.prompt_column], "intent": str(row.get("intent", "")),
                        "reference": row[recipe.response_column], "reply": replies["adapter"],
                        "base_reply": replies["base"]})
    model.train(was_training)
    return samples


def _pick_samples(data: Dataset, recipe: Recipe, n: int) -> list[dict[str, Any]]:
    """n held-out rows with distinct intents when the data has an intent column (shows breadth)."""
    chosen, seen = [], set()
    key = recipe.stratify_column if recipe.stratify_column in data.column_names else None
    for row in data:
        tag = row[key] if key else len(chosen)
        if tag in seen:
            continue
        seen.add(tag)
        chosen.append(row)
        if len(chosen) == n:
            break
    return chosen


def evaluate_generation(model, tokenizer, recipe: Recipe, data: Dataset,
                        trainer: Trainer | None = None, samples: bool = True) -> dict[str, Any]:
    """Mean reply-token loss and perplexity of the adapter and of the base model on the same rows."""
    if not hasattr(model, "disable_adapter"):
        raise LoraswapError("generation eval needs a PEFT model (to compare against its base)")
    trainer = _eval_trainer(model, tokenizer, recipe, trainer)
    encoded = tokenize_generation(data, tokenizer, recipe)
    loss = _mean_loss(trainer, encoded)
    with model.disable_adapter():
        base_loss = _mean_loss(trainer, encoded)
    result: dict[str, Any] = {
        "loss": loss,
        "perplexity": math.exp(loss),
        "base_loss": base_loss,
        "base_perplexity": math.exp(base_loss),
        "loss_reduction": 1.0 - loss / base_loss,
        "rows": len(encoded),
    }
    if samples and trainer.is_world_process_zero() and recipe.num_samples > 0:
        result["samples"] = sample_replies(model, tokenizer, recipe, _pick_samples(data, recipe, recipe.num_samples))
    return result


def evaluate_splits(model, tokenizer, recipe: Recipe, splits: Splits, trainer: Trainer | None = None) -> dict[str, Any]:
    """Metrics for the validation split and (when present) the test split, keyed by split."""
    out: dict[str, Any] = {}
    held_out = {"validation": validation_rows(splits, recipe)} | ({"test": splits.test} if splits.test is not None else {})
    if recipe.task == "embedding":
        return evaluate_retrieval(model, tokenizer, _pooling(recipe), recipe, splits.train, held_out)
    for name, data in held_out.items():
        if recipe.task == "classification":
            out[name] = evaluate_classification(model, tokenizer, recipe, data, splits.labels, trainer)
        else:
            # Sample replies once, from the last held-out split (test when present).
            out[name] = evaluate_generation(model, tokenizer, recipe, data, trainer,
                                            samples=name == list(held_out)[-1])
    return out


def _pooling(recipe: Recipe):
    from adapters.bases import local_base
    from adapters.pooling import read_pooling
    from training.train import base_name

    return read_pooling(local_base(base_name(recipe)))


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """Flat numbers for the manifest: `validation_accuracy`, `test_f1_macro`, `test_loss`, ..."""
    flat: dict[str, float] = {}
    for split, values in metrics.items():
        if not isinstance(values, dict):
            continue
        for key in ("accuracy", "f1_macro", "loss", "perplexity", "base_loss", "base_perplexity", "loss_reduction",
                    *RETRIEVAL_KEYS, *(f"base_{k}" for k in RETRIEVAL_KEYS)):
            if key in values and isinstance(values[key], (int, float)) and math.isfinite(values[key]):
                flat[f"{split}_{key}"] = round(float(values[key]), 6)
    return flat


def load_adapter_model(folder: str | Path, base: str | None = None):
    """(PEFT model, tokenizer, manifest or None) from a published or run adapter folder."""
    import json

    from peft import PeftModel

    from adapters.bases import load_base
    from adapters.manifest import MANIFEST_FILE, Manifest
    from adapters.peft import PEFT_TASKS

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise LoraswapError(f"{folder}: no adapter_config.json (not a LoRA adapter folder)")
    manifest = Manifest.load(folder) if (folder / MANIFEST_FILE).is_file() else None
    config = json.loads((folder / "adapter_config.json").read_text())
    task = manifest.task if manifest else PEFT_TASKS.get(config.get("task_type") or "", "generation")
    base_name = base or (manifest.base_model.name if manifest else config.get("base_model_name_or_path"))
    labels = manifest.labels if manifest else None
    model, tokenizer = load_base(base_name, task, num_labels=len(labels) if labels else None)
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
    model = PeftModel.from_pretrained(model, str(folder))
    return model.eval(), tokenizer, manifest, task
