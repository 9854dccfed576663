"""Fine-tune one adapter with the Hugging Face Trainer + PEFT: LoRA (served) or BitFit (training-only).

The Trainer owns the loop (AdamW, linear warm-up/decay, clipping, checkpoints, DDP); this file only
builds the model, the data and the arguments, and decides which parameters train.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    Trainer,
    TrainingArguments,
    set_seed,
)

from adapters.bases import DEFAULT_DECODER, DEFAULT_ENCODER, load_base
from adapters.errors import LoraswapError
from adapters.peft import seq_cls_heads
from training.data import (
    Splits,
    load_splits,
    longest_first,
    tokenize_classification,
    tokenize_generation,
    validation_rows,
)
from training.dropout import use_bulk_dropout
from training.embedding import EmbeddingTrainer, PairCollator, has_pairs, pairs, tokenize_pairs
from training.recipe import Recipe

log = logging.getLogger("loraswap.train")

ADAPTER_DIR = "adapter"  # inside the run folder: PEFT's own save of the best checkpoint
BITFIT_FILE = "bitfit_model.safetensors"


@dataclass
class TrainResult:
    recipe: Recipe
    run_dir: Path
    adapter_dir: Path
    splits: Splits
    model: Any
    tokenizer: Any
    trainer: Trainer
    train_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


def base_name(recipe: Recipe) -> str:
    return recipe.base or (DEFAULT_DECODER if recipe.task == "generation" else DEFAULT_ENCODER)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; platform.processor() is often empty there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    threads = torch.get_num_threads()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} cores, torch threads {threads}, "
            f"processes {world}")


def collator(tokenizer, task: str):
    """Dynamic padding for training and evaluation batches. Pads to a multiple of 8 on CUDA (tensor-core
    shapes), not on CPU, where it only adds work: SST-2's length-grouped batches carry 24 % more tokens
    padded to 8 than padded to their longest row."""
    multiple = 8 if torch.cuda.is_available() else None
    if task == "classification":
        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=multiple)


def _num_layers(model) -> int:
    return int(getattr(model.config, "num_hidden_layers", 0) or getattr(model.config, "n_layer", 0))


def _layer_index(name: str) -> int | None:
    """Index of the transformer layer a parameter belongs to (`...layer.3.` / `...layers.3.` / `...h.3.`)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layer", "layers", "h") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def head_modules(model) -> list[str]:
    """Classification head modules trained in full and shipped via modules_to_save: PEFT's SEQ_CLS head,
    plus the pooler where the model has one."""
    names = {n for n, _ in model.named_modules()}
    return seq_cls_heads(names) + [n for n in ("bert.pooler.dense", "pooler.dense") if n in names]


def apply_lora(model, recipe: Recipe):
    from peft import LoraConfig, TaskType, get_peft_model

    n_layers = _num_layers(model)
    layers = None
    if recipe.freeze_layers:
        if recipe.freeze_layers >= n_layers:
            raise LoraswapError(f"freeze_layers={recipe.freeze_layers} leaves none of the {n_layers} layers")
        layers = list(range(recipe.freeze_layers, n_layers))
    save = None
    if recipe.task == "classification":
        # PEFT adds the classifier itself for SEQ_CLS; list it anyway so the intent is explicit.
        heads = head_modules(model)
        save = seq_cls_heads(heads)
        if recipe.train_pooler and any("pooler" in h for h in heads):
            save.append("pooler")
    task_types = {"classification": TaskType.SEQ_CLS, "embedding": TaskType.FEATURE_EXTRACTION}
    config = LoraConfig(
        task_type=task_types.get(recipe.task, TaskType.CAUSAL_LM),
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=recipe.targets,
        layers_to_transform=layers,
        modules_to_save=save,
        use_rslora=recipe.use_rslora,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise LoraswapError(f"cannot apply LoRA targets {recipe.targets}: {exc}") from None


def apply_bitfit(model, recipe: Recipe):
    """Bias-only fine-tuning (Ben Zaken et al. 2021) plus the head; everything else frozen."""
    heads = tuple(head_modules(model))
    for name, param in model.named_parameters():
        in_head = name.startswith(heads)
        layer = _layer_index(name)
        frozen_layer = layer is not None and layer < recipe.freeze_layers
        in_embeddings = "embeddings" in name or "embed_tokens" in name or ".wte." in name or ".wpe." in name
        bias = name.endswith(".bias")
        param.requires_grad = in_head or (
            bias and not frozen_layer and not (recipe.freeze_embeddings and in_embeddings)
        )
    return model


def count_trainable(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def classification_metrics(eval_pred) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    logits, labels = eval_pred
    preds = np.asarray(logits).argmax(-1)
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "f1_macro": float(f1_score(labels, preds, average="macro")),
    }


def _tensorboard_callback(run_dir: Path):
    """Logs (loss, learning_rate, grad_norm, eval_*) under <run>/tensorboard, written by rank 0 only."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    if int(os.environ.get("RANK", "0")) != 0:
        return None
    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_dir / "tensorboard")))


def training_arguments(recipe: Recipe, run_dir: Path) -> TrainingArguments:
    metric = recipe.best_metric
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=recipe.batch_size,
        per_device_eval_batch_size=recipe.eval_batch_size,
        gradient_accumulation_steps=recipe.grad_accum,
        num_train_epochs=recipe.epochs,
        max_steps=recipe.max_steps,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=recipe.warmup_ratio,  # a float < 1 is a ratio of the total steps in transformers v5
        optim="adamw_torch",
        max_grad_norm=recipe.max_grad_norm,
        label_smoothing_factor=recipe.label_smoothing,
        eval_strategy="steps",
        eval_steps=recipe.eval_steps,
        save_strategy="steps",
        save_steps=recipe.eval_steps,  # checkpoints on eval steps: load_best_model_at_end needs both aligned
        save_total_limit=recipe.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model=metric,
        greater_is_better=metric not in ("loss", "eval_loss"),
        logging_steps=recipe.logging_steps,
        logging_first_step=True,
        report_to="none",  # the TensorBoard callback is added explicitly, to control its folder
        seed=recipe.seed,
        data_seed=recipe.seed,
        train_sampling_strategy="group_by_length" if recipe.group_by_length else "random",
        label_names=["labels"],
        prediction_loss_only=recipe.task == "generation",  # full-vocab logits would not fit in memory
        use_cpu=not torch.cuda.is_available(),
        ddp_backend=("gloo" if not torch.cuda.is_available() else None) if distributed else None,
        ddp_find_unused_parameters=False if distributed else None,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        save_only_model=False,
    )


def _prepare_run_dir(run_dir: Path, resume: bool) -> None:
    if resume:
        if not any(run_dir.glob("checkpoint-*")):
            raise LoraswapError(f"--resume: no checkpoint in {run_dir}")
        return
    # A fresh run must not mix its checkpoints with an older run's (Trainer would reuse the names).
    if int(os.environ.get("RANK", "0")) == 0 and run_dir.exists():
        for old in run_dir.glob("checkpoint-*"):
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def build(recipe: Recipe):
    """(model, tokenizer, splits, train_ds, eval_ds) ready for the Trainer."""
    splits = load_splits(recipe)
    num_labels = len(splits.labels) if splits.labels else None
    model, tokenizer = load_base(base_name(recipe), recipe.task, num_labels=num_labels)
    if recipe.task == "classification":
        model.config.id2label = dict(enumerate(splits.labels))
        model.config.label2id = {label: i for i, label in enumerate(splits.labels)}
        model.config.problem_type = "single_label_classification"
        model = apply_lora(model, recipe) if recipe.method == "lora" else apply_bitfit(model, recipe)
        train_ds = tokenize_classification(splits.train, tokenizer, recipe, splits.labels)
        eval_ds = longest_first(tokenize_classification(validation_rows(splits, recipe), tokenizer, recipe, splits.labels))
    elif recipe.task == "embedding":
        model = apply_lora(model, recipe)
        if recipe.confusable_batches and has_pairs(splits.train, recipe):
            raise LoraswapError("confusable_batches needs labelled texts, not given pairs")
        pair_rows = pairs(splits.train, recipe)
        train_ds = tokenize_pairs(pair_rows, tokenizer, recipe)
        if recipe.confusable_batches:
            train_ds = train_ds.select(_confusable(model, tokenizer, pair_rows, recipe))
        eval_ds = validation_rows(splits, recipe)  # raw rows: EmbeddingTrainer.evaluate retrieves them
    else:
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        model = apply_lora(model, recipe)
        train_ds = tokenize_generation(splits.train, tokenizer, recipe)
        eval_ds = tokenize_generation(validation_rows(splits, recipe), tokenizer, recipe)
    use_bulk_dropout(model)  # training-only: nn.Dropout's CPU masks are the slow part of a step
    return model, tokenizer, splits, train_ds, eval_ds


def _confusable(model, tokenizer, pair_rows, recipe: Recipe) -> list[int]:
    """The row order of `confusable_batches`, from the base's vectors of the anchors (the new LoRA is zero)."""
    from adapters.bases import local_base
    from adapters.pooling import read_pooling
    from training.embedding import confusable_order, encode

    vectors = encode(model, tokenizer, pair_rows["anchor"], read_pooling(local_base(base_name(recipe))),
                     recipe.max_length, recipe.eval_batch_size)
    return confusable_order(pair_rows["group"], vectors, recipe.batch_size, recipe.confusable_batches, recipe.seed)


def train(recipe: Recipe) -> TrainResult:
    """Train, restore the best checkpoint, and save the adapter under <run>/adapter."""
    set_seed(recipe.seed)
    run_dir = recipe.run_dir
    _prepare_run_dir(run_dir, recipe.resume)
    model, tokenizer, splits, train_ds, eval_ds = build(recipe)
    trainable, total = count_trainable(model)
    log.info("%s: %d trainable of %d parameters (%.2f%%)", recipe.method, trainable, total, 100 * trainable / total)

    callbacks = []
    if recipe.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.early_stopping_patience))
    tb = _tensorboard_callback(run_dir)
    if tb is not None:
        callbacks.append(tb)

    common = dict(model=model, args=training_arguments(recipe, run_dir), train_dataset=train_ds,
                  eval_dataset=eval_ds, processing_class=tokenizer, callbacks=callbacks)
    if recipe.task == "embedding":
        from adapters.bases import local_base
        from adapters.pooling import read_pooling

        trainer: Trainer = EmbeddingTrainer(**common, data_collator=PairCollator(tokenizer), recipe=recipe,
                                            pooling=read_pooling(local_base(base_name(recipe))),
                                            index=splits.train, queries=eval_ds)
    else:
        trainer = Trainer(**common, data_collator=collator(tokenizer, recipe.task),
                          compute_metrics=classification_metrics if recipe.task == "classification" else None)
    if recipe.task == "classification":
        # The classification models return a per-batch mean loss and ignore `num_items_in_batch`, but their
        # forward takes **kwargs, so the Trainer would treat that loss as token-normalised: it would skip the
        # division by grad_accum and multiply it by the process count (2x loss, gradients and eval loss).
        trainer.model_accepts_loss_kwargs = False
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if recipe.resume else None)
    seconds = time.perf_counter() - start

    adapter_dir = run_dir / ADAPTER_DIR
    if trainer.is_world_process_zero():
        shutil.rmtree(adapter_dir, ignore_errors=True)
        adapter_dir.mkdir(parents=True)
        if recipe.method == "lora":
            trainer.model.save_pretrained(adapter_dir)  # PEFT's own format: adapter_config + safetensors
        else:
            save_bitfit(trainer.model, adapter_dir)
    trainer.accelerator.wait_for_everyone()

    return TrainResult(
        recipe=recipe,
        run_dir=run_dir,
        adapter_dir=adapter_dir,
        splits=splits,
        model=trainer.model,
        tokenizer=tokenizer,
        trainer=trainer,
        train_seconds=seconds,
        history=list(trainer.state.log_history),
    )


def save_bitfit(model, folder: Path) -> None:
    """BitFit keeps trained biases + head as plain safetensors; never published (not a LoRA adapter)."""
    from safetensors.torch import save_file

    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(folder / BITFIT_FILE), metadata={"method": "bitfit"})
