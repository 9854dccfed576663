"""`loraswap train` and `loraswap eval`: the plugin registered through the `loraswap.commands` entry point.

Also runnable as `python -m training train ...`, which is how `torchrun --nproc_per_node N -m training`
starts a distributed run (every process parses the same arguments; rank 0 writes reports and publishes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from adapters.errors import LoraswapError

# Flags that map 1:1 onto recipe keys (dest == recipe key). Defaults stay None: "not given" must not
# override the YAML.
_FLAGS: list[tuple[str, type, str]] = [
    ("--name", str, "adapter name in the registry"),
    ("--task", str, "classification | generation | embedding"),
    ("--data", str, "data folder (train/validation/test .jsonl/.csv/.parquet) or one training file"),
    ("--train-file", str, "explicit training file"),
    ("--validation-file", str, "explicit validation file (default: a stratified split of train)"),
    ("--test-file", str, "explicit test file"),
    ("--text-column", str, "input text column (classification)"),
    ("--label-column", str, "label column (classification)"),
    ("--prompt-column", str, "prompt column (generation)"),
    ("--response-column", str, "reply column (generation)"),
    ("--base", str, "base model: embedded name, local folder or hub id"),
    ("--method", str, "lora | bitfit (bitfit: classification, training-only)"),
    ("--lora-r", int, "LoRA rank"),
    ("--lora-alpha", float, "LoRA alpha"),
    ("--lora-dropout", float, "LoRA dropout"),
    ("--lora-targets", str, "comma-separated target module names"),
    ("--freeze-layers", int, "leave the lowest N layers untouched"),
    ("--learning-rate", float, "peak learning rate (AdamW, linear warm-up then decay)"),
    ("--epochs", float, "training epochs"),
    ("--max-steps", int, "optimizer steps (overrides --epochs when > 0)"),
    ("--batch-size", int, "per-process batch size"),
    ("--max-length", int, "max tokens per example"),
    ("--eval-steps", int, "evaluate + checkpoint every N steps"),
    ("--early-stopping-patience", int, "stop after N evaluations without improvement (0: off)"),
    ("--max-train-rows", int, "train on a seeded slice of N rows"),
    ("--seed", int, "random seed"),
    ("--output-dir", str, "run folder (default runs/<name>)"),
    ("--registry", str, "registry path or URL to publish into"),
    ("--promote", str, "point this alias (e.g. stable) at the new version"),
]


def _add_recipe_flags(p: argparse.ArgumentParser) -> None:
    for flag, kind, help_text in _FLAGS:
        p.add_argument(flag, type=kind, default=None, help=help_text)
    p.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="keep embedding biases frozen (BitFit)")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `train` and `eval` (entry point `loraswap.commands: train`)."""
    p = subparsers.add_parser("train", help="train, evaluate and publish an adapter",
                              description="loraswap train [RECIPE.yaml] [--set key=value ...] [flags]")
    p.add_argument("recipe", nargs="?", help="recipe YAML (or the name of a shipped recipe)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any recipe key (repeatable)")
    p.add_argument("--no-publish", action="store_true", help="train and evaluate only")
    _add_recipe_flags(p)
    p.set_defaults(func=train_command)

    e = subparsers.add_parser("eval", help="evaluate an adapter on a data set",
                              description="loraswap eval ADAPTER --data PATH")
    e.add_argument("adapter", help="adapter folder, or NAME[@VERSION|@ALIAS] in --registry")
    e.add_argument("--data", required=True, help="data folder or file")
    e.add_argument("--registry", default=None, help="registry to resolve ADAPTER in")
    e.add_argument("--base", default=None, help="base model (default: the one in the manifest)")
    e.add_argument("--text-column", default=None)
    e.add_argument("--label-column", default=None)
    e.add_argument("--prompt-column", default=None)
    e.add_argument("--response-column", default=None)
    e.add_argument("--output-dir", default=None, help="where eval/ goes (default runs/eval-<name>)")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="override recipe keys (e.g. max_length)")
    e.set_defaults(func=eval_command)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from training.recipe import parse_set

    keys = [f[0].lstrip("-").replace("-", "_") for f in _FLAGS] + ["freeze_embeddings", "resume"]
    values = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if isinstance(values.get("lora_targets"), str):
        values["lora_targets"] = [t.strip() for t in values["lora_targets"].split(",") if t.strip()]
    values.update(parse_set(getattr(args, "set", None)))
    return values


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def train_command(args: argparse.Namespace) -> int:
    from training.recipe import load_recipe

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recipe = load_recipe(args.recipe, _overrides(args))
    command = "loraswap train " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else None
    outcome = run(recipe, publish=not args.no_publish, command=command)
    if _is_main():
        print(json.dumps(outcome, indent=2))
    return 0


def run(recipe, *, publish: bool = True, command: str | None = None) -> dict[str, Any]:
    """Train -> evaluate -> eval/ report -> publish. Returns a summary (what the CLI prints)."""
    from adapters.fingerprint import describe_base
    from training.evaluate import evaluate_splits, headline
    from training.report import write_eval_folder
    from training.train import base_name, count_trainable, machine, train

    result = train(recipe)
    metrics = evaluate_splits(result.model, result.tokenizer, recipe, result.splits, trainer=result.trainer)
    outcome: dict[str, Any] = {"run_dir": str(result.run_dir), "metrics": headline(metrics),
                               "train_seconds": round(result.train_seconds, 1)}
    if not _is_main():
        return outcome
    state = result.trainer.state
    training = {
        "recipe": recipe.to_dict(),
        "seed": recipe.seed,
        "base": base_name(recipe),
        "method": recipe.method,
        "train_seconds": round(result.train_seconds, 1),
        "machine": machine(),
        "steps": state.global_step,
        "epochs_done": round(float(state.epoch or 0), 3),
        "best_checkpoint": state.best_model_checkpoint,
        "best_validation_metric": state.best_metric,
        "trainable_params": count_trainable(result.model)[0],
    }
    if command:
        training["command"] = command
    label_columns = None
    if recipe.task == "classification":
        label_columns = {"train": result.splits.train[recipe.label_column],
                         "validation": result.splits.validation[recipe.label_column]}
        if result.splits.test is not None:
            label_columns["test"] = result.splits.test[recipe.label_column]
    calibration = None
    if recipe.task == "classification":
        from training.calibration import calibrate

        calibration = calibrate(metrics, result.splits.labels, recipe.abstain_coverage, recipe.out_of_scope_label)
        outcome["calibration"] = {"temperature": round(calibration["temperature"], 6),
                                  "min_score": round(calibration["min_score"], 6)}
    eval_dir = write_eval_folder(result.run_dir / "eval", name=recipe.name, task=recipe.task, metrics=metrics,
                                 labels=result.splits.labels, label_columns=label_columns,
                                 history=result.history, training=training, dataset=result.splits.info,
                                 calibration=calibration)
    outcome["report"] = str(eval_dir / "report.md")
    if recipe.method == "bitfit":
        # BitFit changes every bias of the base: the serving engine shares one base across adapters,
        # so a BitFit result cannot be served as a LoRA adapter. It stays in the run folder.
        outcome["published"] = None
        outcome["note"] = "BitFit adapters are training-only and are not published"
        return outcome
    if publish and recipe.registry:
        from adapters.bases import load_base
        from adapters.peft import BASE_TASKS
        from training.publish import publish as publish_adapter

        # Fingerprint the base exactly as the server loads it (a fresh, unwrapped copy; embedding adapters
        # are served on the encoder as the classifier loads it).
        base_task = BASE_TASKS.get(recipe.task, recipe.task)
        base_model, _ = load_base(base_name(recipe), base_task)
        info = describe_base(base_model, base_name(recipe), base_task)
        del base_model
        name, version = publish_adapter(
            result.adapter_dir, eval_dir, registry=recipe.registry, name=recipe.name, task=recipe.task,
            base_info=info, labels=result.splits.labels, metrics=headline(metrics),
            dataset=result.splits.info, training=training, promote=recipe.promote,
            calibration=outcome.get("calibration"),
        )
        outcome["published"] = f"{name}@{version}"
    return outcome


def eval_command(args: argparse.Namespace) -> int:
    from training.data import load_splits
    from training.evaluate import evaluate_splits, headline, load_adapter_model
    from training.recipe import load_recipe
    from training.report import write_eval_folder

    folder = Path(args.adapter)
    if not folder.is_dir():
        if not args.registry:
            raise LoraswapError(f"{args.adapter}: no such folder (give --registry to resolve a name)")
        from adapters.registry import Registry

        reg = Registry(args.registry)
        name, version = reg.resolve(args.adapter)
        folder = reg.fetch(name, version)
    model, tokenizer, manifest, task = load_adapter_model(folder, args.base)
    name = manifest.name if manifest else folder.name
    overrides: dict[str, Any] = {"name": name, "task": task, "data": args.data,
                                 "output_dir": args.output_dir or f"runs/eval-{name}"}
    for key in ("text_column", "label_column", "prompt_column", "response_column"):
        if getattr(args, key):
            overrides[key] = getattr(args, key)
    if manifest and manifest.training and isinstance(manifest.training.get("recipe"), dict):
        trained = manifest.training["recipe"]  # evaluate the way it was trained (columns, max_length, prompts)
        for key in ("text_column", "label_column", "prompt_column", "response_column", "max_length",
                    "system_prompt", "stratify_column"):
            overrides.setdefault(key, trained.get(key))
    from training.recipe import parse_set

    overrides.update(parse_set(args.set))
    recipe = load_recipe(None, overrides)
    splits = load_splits(recipe)
    if task == "classification" and manifest and manifest.labels:
        unknown = sorted(set(splits.labels) - set(manifest.labels))
        if unknown:
            raise LoraswapError(f"{args.data}: labels {unknown} are not among the adapter's labels")
        splits.labels = list(manifest.labels)
    metrics = evaluate_splits(model, tokenizer, recipe, splits)
    label_columns = None
    if task == "classification":
        label_columns = {"validation": splits.validation[recipe.label_column]}
        if splits.test is not None:
            label_columns["test"] = splits.test[recipe.label_column]
    eval_dir = write_eval_folder(recipe.run_dir / "eval", name=name, task=task, metrics=metrics,
                                 labels=splits.labels, label_columns=label_columns, dataset=splits.info)
    print(json.dumps({"adapter": str(folder), "metrics": headline(metrics), "report": str(eval_dir / "report.md")},
                     indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m training ...`, torchrun); the product entry is `loraswap`."""
    parser = argparse.ArgumentParser(prog="python -m training")
    parser.add_argument("--debug", action="store_true")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LoraswapError as exc:
        if args.debug:
            raise
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
