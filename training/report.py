"""The eval/ folder of an adapter: metrics.json, confusion_matrix.png, label_distribution.png, report.md."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    n = len(labels)
    size = min(4 + 0.18 * n, 22)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=max(4, 10 - n // 12))
    ax.set_yticks(range(n), labels, fontsize=max(4, 10 - n // 12))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 12:  # numbers stay readable only on small matrices
        peak = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_label_distribution(columns: dict[str, list[str]], labels: list[str], path: Path) -> None:
    """Bar chart of label counts per split (shows imbalance the accuracy number hides)."""
    n = len(labels)
    fig, ax = plt.subplots(figsize=(min(4 + 0.22 * n, 24), 4))
    width = 0.8 / max(1, len(columns))
    for k, (split, values) in enumerate(columns.items()):
        counts = Counter(values)
        ax.bar([i + k * width for i in range(n)], [counts.get(label, 0) for label in labels], width, label=split)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(n)], labels, rotation=90 if n > 6 else 0,
                  fontsize=max(4, 10 - n // 12))
    ax.set_ylabel("rows")
    ax.set_yscale("log" if n > 6 else "linear")
    ax.legend()
    ax.set_title("label distribution")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curve(history: list[dict[str, Any]], path: Path, metric: str) -> None:
    """Training loss and the validation metric against the step (the learning curve)."""
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h[f"eval_{metric}"]) for h in history if f"eval_{metric}" in h]
    if not train and not evals:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if evals:
        ax2 = ax.twinx() if metric != "loss" else ax
        ax2.plot(*zip(*evals, strict=True), "o-", label=f"validation {metric}", color="tab:orange")
        ax2.set_ylabel(metric)
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(before: list[dict], after: list[dict], path: Path, temperature: float) -> None:
    """Reliability diagram: accuracy against mean confidence per bin, before and after the temperature."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", label="perfectly calibrated")
    for bins, name in ((before, "softmax"), (after, f"temperature {temperature:.2f}")):
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", label=name)
    ax.set_xlabel("confidence (top label)")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_coverage(curves: dict[str, list[dict]], path: Path) -> None:
    """Accuracy on answered rows against the share answered (the most confident first)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for split, curve in curves.items():
        ax.plot([p["coverage"] for p in curve], [p["accuracy"] for p in curve], "o-", label=split)
    ax.set_xlabel("coverage (share answered)")
    ax.set_ylabel("accuracy on answered")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


RETRIEVAL = (("accuracy_at_1", "accuracy@1"), ("recall_at_5", "recall@5"), ("mrr_at_10", "MRR@10"))


def plot_retrieval(metrics: dict[str, Any], path: Path, title: str) -> None:
    """Base vs adapter bars for each retrieval metric of one split."""
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(RETRIEVAL))
    for k, (who, prefix) in enumerate((("base", "base_"), ("adapter", ""))):
        values = [metrics[f"{prefix}{key}"] for key, _ in RETRIEVAL]
        bars = ax.bar([x + 0.4 * k for x in xs], values, 0.4, label=who)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks([x + 0.2 for x in xs], [label for _, label in RETRIEVAL])
    low = min(min(metrics[k], metrics[f"base_{k}"]) for k, _ in RETRIEVAL)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def calibration_lines(calibration: dict[str, Any], folder: Path) -> list[str]:
    """The report's calibration section; draws reliability.png and coverage.png into `folder`."""
    splits = calibration["splits"]
    last = "test" if "test" in splits else "validation"
    plot_reliability(splits[last]["reliability_before"], splits[last]["reliability_after"],
                     folder / "reliability.png", calibration["temperature"])
    plot_coverage({s: m["curve"] for s, m in splits.items()}, folder / "coverage.png")
    lines = ["## Calibration and abstention", "",
             f"- temperature (fitted on validation, NLL): {calibration['temperature']:.4f}",
             f"- default min_score: {calibration['min_score']:.4f} (keeps {100 * calibration['coverage']:.0f} % of"
             " in-scope validation answered)", "",
             "| split | ECE before | ECE after | in-scope answered | accuracy on answered | out-of-scope caught |",
             "|---|---|---|---|---|---|"]
    for split, m in splits.items():
        caught = f"{100 * m['out_of_scope_caught']:.1f} %" if "out_of_scope_caught" in m else "-"
        lines.append(f"| {split} | {m['ece_before']:.4f} | {m['ece_after']:.4f} | {100 * m['in_scope_answered']:.1f} %"
                     f" | {_fmt(m['accuracy_answered'])} | {caught} |")
    lines += ["", f"![reliability diagram ({last})](reliability.png)", "", "![accuracy/coverage](coverage.png)", ""]
    return lines


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def write_eval_folder(folder: Path, *, name: str, task: str, metrics: dict[str, Any], labels: list[str] | None,
                      label_columns: dict[str, list[str]] | None = None, history: list[dict] | None = None,
                      training: dict[str, Any] | None = None, dataset: dict[str, Any] | None = None,
                      calibration: dict[str, Any] | None = None) -> Path:
    """Write eval/ and return it. `metrics` is keyed by split (evaluate.evaluate_splits)."""
    folder.mkdir(parents=True, exist_ok=True)
    clean = {s: {k: v for k, v in m.items() if k not in ("report_text", "logits", "label_ids")} for s, m in metrics.items()}
    summary = {"task": task, "splits": clean, "training": training or {}}
    if calibration:
        summary["calibration"] = calibration
    (folder / "metrics.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    lines = [f"# {name}: evaluation report", ""]
    if training:
        lines += ["## Training", ""]
        for key in ("base", "method", "train_seconds", "machine", "steps", "epochs_done", "trainable_params",
                    "command", "recipe"):
            if key in training:
                lines.append(f"- **{key}**: {_fmt(training[key])}")
        lines.append("")
    if dataset:
        lines += ["## Data", "", f"- path: `{dataset.get('path')}`", f"- sha256: `{dataset.get('sha256')}`",
                  f"- rows: {dataset.get('rows')}", ""]
    if task == "classification" and labels:
        split_for_plot = "test" if "test" in metrics else "validation"
        plot_confusion(metrics[split_for_plot]["confusion_matrix"], labels, folder / "confusion_matrix.png",
                       f"{name} — {split_for_plot}")
        if label_columns:
            plot_label_distribution(label_columns, labels, folder / "label_distribution.png")
        lines += ["## Results", "", "| split | rows | accuracy | macro-F1 |", "|---|---|---|---|"]
        for split, m in metrics.items():
            lines.append(f"| {split} | {m['rows']} | {m['accuracy']:.4f} | {m['f1_macro']:.4f} |")
        lines.append("")
        for split, m in metrics.items():
            lines += [f"### Per-class report ({split})", "", "```", m["report_text"].rstrip(), "```", ""]
        lines += [f"![confusion matrix]({'confusion_matrix.png'})", ""]
        if label_columns:
            lines += ["![label distribution](label_distribution.png)", ""]
        if calibration:
            lines += calibration_lines(calibration, folder)
    elif task == "embedding":
        split_for_plot = "test" if "test" in metrics else "validation"
        plot_retrieval(metrics[split_for_plot], folder / "retrieval.png", f"{name} — {split_for_plot} vs train")
        lines += ["## Results (retrieval: each split's rows as queries, the train split as the index, cosine)", "",
                  "| split | rows | model | " + " | ".join(label for _, label in RETRIEVAL) + " |",
                  "|---|---|---|---|---|---|"]
        for split, m in metrics.items():
            for who, prefix in (("base", "base_"), ("adapter", "")):
                lines.append(f"| {split} | {m['rows']} | {who} | "
                             + " | ".join(f"{m[prefix + key]:.4f}" for key, _ in RETRIEVAL) + " |")
        lines += ["", "accuracy@1: the nearest train row has the query's label; recall@5: one of the 5 nearest"
                  " has; MRR@10: mean of 1/rank of the first same-label row among the 10 nearest (0 if none).", "",
                  "![retrieval](retrieval.png)", ""]
    else:
        lines += ["## Results (mean loss on reply tokens; lower is better)", "",
                  "| split | rows | adapter loss | adapter ppl | base loss | base ppl | loss reduction |",
                  "|---|---|---|---|---|---|---|"]
        for split, m in metrics.items():
            lines.append(f"| {split} | {m['rows']} | {m['loss']:.4f} | {m['perplexity']:.2f} | {m['base_loss']:.4f}"
                         f" | {m['base_perplexity']:.2f} | {100 * m['loss_reduction']:.1f} % |")
        lines.append("")
        samples = next((m["samples"] for m in metrics.values() if m.get("samples")), [])
        if samples:
            lines += ["## Sample replies (greedy, held-out prompts)", ""]
            for i, s in enumerate(samples, 1):
                lines += [f"### {i}. {s['prompt']}", "", f"intent: `{s['intent']}`", "",
                          "**adapter:**", "", _quote(s["reply"]), "", "**base model:**", "", _quote(s["base_reply"]),
                          "", "**reference:**", "", _quote(s["reference"]), ""]
    if history:
        metric = {"classification": "accuracy", "embedding": "accuracy_at_1"}.get(task, "loss")
        plot_curve(history, folder / "learning_curve.png", metric)
        if (folder / "learning_curve.png").exists():
            lines += ["## Learning curve", "", "![learning curve](learning_curve.png)", ""]
        evals = [h for h in history if f"eval_{metric}" in h]
        if evals:
            lines += [f"| step | epoch | validation {metric} |", "|---|---|---|"]
            lines += [f"| {h['step']} | {h.get('epoch', 0):.2f} | {h[f'eval_{metric}']:.4f} |" for h in evals]
            lines.append("")
    (folder / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text or "(empty)").splitlines())
