"""Open-set check of abstention: hold some BANKING77 intents out of training, train an intent adapter on
the rest, and count how many held-out-intent queries each confidence score abstains on at the threshold
that keeps a target share (95 %) of in-scope validation queries answered.

    python -m benchmarks.openset [--held-out 10] [--seed 0] [--epochs 0.6] [--max-length 32] [--freeze-layers 3] [--logits FILE]

Training and logits go to runs/openset/ (logits.npz lets `--logits` re-score without retraining);
the result goes to benchmarks/results/openset-cpu-<date>-<epochs>ep.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "banking77"
RESULTS = Path(__file__).parent / "results"
RUN = Path("runs/openset")


def held_out_intents(labels: list[str], k: int, seed: int) -> list[str]:
    """The seeded rule: k intents drawn from the sorted label list."""
    return sorted(random.Random(seed).sample(sorted(labels), k))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_in_scope(data: Path, out: Path, held: list[str]) -> dict[str, list[dict]]:
    """In-scope splits (+ labels.json) under `out`; returns the held-out rows per split."""
    out.mkdir(parents=True, exist_ok=True)
    labels = [x for x in json.loads((data / "labels.json").read_text()) if x not in held]
    (out / "labels.json").write_text(json.dumps(labels, indent=1))
    outside = {}
    for split in ("train", "validation", "test"):
        rows = _rows(data / f"{split}.jsonl")
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["label"] not in held))
        outside[split] = [r for r in rows if r["label"] in held]
    return outside


def train_and_predict(args) -> Path:
    from datasets import Dataset

    from training.evaluate import predict_logits
    from training.recipe import load_recipe
    from training.train import machine, train

    labels = json.loads((DATA / "labels.json").read_text())
    held = held_out_intents(labels, args.held_out, args.seed)
    outside = write_in_scope(DATA, RUN / "data", held)
    recipe = load_recipe("support-intent", {
        "name": "openset-intent", "data": str(RUN / "data"), "output_dir": str(RUN / "run"),
        "epochs": args.epochs, "max_length": args.max_length, "eval_steps": args.eval_steps,
        "freeze_layers": args.freeze_layers})
    result = train(recipe)
    arrays = {}
    for split in ("validation", "test"):
        inside = result.splits.validation if split == "validation" else result.splits.test
        arrays[f"{split}_in_logits"], arrays[f"{split}_in_labels"], _ = predict_logits(
            result.model, result.tokenizer, recipe, inside, result.splits.labels, result.trainer)
        # held-out rows get a placeholder label: only their logits matter
        fake = Dataset.from_list([{"text": r["text"], "label": result.splits.labels[0]} for r in outside[split]])
        arrays[f"{split}_out_logits"], _, _ = predict_logits(
            result.model, result.tokenizer, recipe, fake, result.splits.labels, result.trainer)
    path = RUN / "logits.npz"
    meta = {"held_out": held, "epochs": args.epochs, "max_length": args.max_length, "seed": args.seed,
            "freeze_layers": args.freeze_layers, "machine": machine(),
            "train_seconds": round(result.train_seconds, 1), "steps": result.trainer.state.global_step,
            "recipe": "support-intent"}
    np.savez(path, meta=json.dumps(meta), **arrays)
    return path


def score_table(arrays, coverage: float) -> dict:
    """Per score: the threshold keeping `coverage` of in-scope validation answered, and on test the in-scope
    share answered, accuracy on answered in-scope rows and the share of held-out-intent rows abstained on."""
    from training import calibration as cal

    temperature = cal.fit_temperature(arrays["validation_in_logits"], arrays["validation_in_labels"])
    out = {"temperature": temperature, "scores": {}}
    for kind in cal.SCORES:
        s = {key: cal.confidence(arrays[f"{key}_logits"], kind, temperature)
             for key in ("validation_in", "validation_out", "test_in", "test_out")}
        t = cal.threshold_for_coverage(s["validation_in"], coverage)
        answered = s["test_in"] >= t
        correct = arrays["test_in_logits"].argmax(-1) == arrays["test_in_labels"]
        out["scores"][kind] = {
            "threshold": t,
            "validation_held_out_abstained": float((s["validation_out"] < t).mean()),
            "test_in_scope_answered": float(answered.mean()),
            "test_accuracy_answered": float(correct[answered].mean()),
            "test_held_out_abstained": float((s["test_out"] < t).mean()),
        }
    probs = {name: cal.probabilities(arrays["test_in_logits"], t) for name, t in (("before", 1.0), ("after", temperature))}
    out["test_ece"] = {name: cal.expected_calibration_error(p, arrays["test_in_labels"]) for name, p in probs.items()}
    out["test_accuracy"] = float((arrays["test_in_logits"].argmax(-1) == arrays["test_in_labels"]).mean())
    return out


def write_report(arrays, coverage: float, results: Path) -> Path:
    import os

    meta = json.loads(str(arrays["meta"]))
    table = score_table(arrays, coverage)
    rows = {k: int(len(arrays[f"{k}_logits"])) for k in ("validation_in", "validation_out", "test_in", "test_out")}
    load = os.getloadavg()
    summary = {"meta": meta, "coverage": coverage, "rows": rows, "load_average": load, **table}
    stem = f"openset-cpu-{datetime.date.today().isoformat()}-{meta['epochs']:g}ep"  # runs differ in length
    (results / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "# Open-set abstention on BANKING77 (held-out intents)", "",
        f"- held out of training ({len(meta['held_out'])} of 77, `random.Random({meta['seed']}).sample(sorted(labels),"
        f" {len(meta['held_out'])})`): {', '.join(meta['held_out'])}",
        f"- adapter: the `support-intent` recipe with epochs {meta['epochs']}, max_length {meta['max_length']},"
        f" freeze_layers {meta['freeze_layers']} ({meta['steps']} steps, {meta['train_seconds']} s of training)",
        f"- machine: {meta['machine']}; load average while scoring {load[0]:.1f} (2 cores, shared with other work)",
        f"- rows: validation {rows['validation_in']} in-scope / {rows['validation_out']} held-out;"
        f" test {rows['test_in']} / {rows['test_out']}",
        f"- test accuracy (in-scope, no abstention) {table['test_accuracy']:.4f}; temperature {table['temperature']:.3f};"
        f" test ECE {table['test_ece']['before']:.4f} -> {table['test_ece']['after']:.4f}", "",
        f"Thresholds keep {100 * coverage:.0f} % of in-scope validation answered.", "",
        "| score | threshold | test in-scope answered | test accuracy on answered | held-out abstained (validation)"
        " | held-out abstained (test) |", "|---|---|---|---|---|---|"]
    for kind, m in table["scores"].items():
        lines.append(f"| {kind} | {m['threshold']:.4f} | {100 * m['test_in_scope_answered']:.1f} % |"
                     f" {m['test_accuracy_answered']:.4f} | {100 * m['validation_held_out_abstained']:.1f} % |"
                     f" {100 * m['test_held_out_abstained']:.1f} % |")
    (results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return results / f"{stem}.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.openset")
    p.add_argument("--held-out", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    # Short enough for 2 shared cores: ~0.6 epoch (~150 steps), LoRA on the top 3 of 6 layers (the shipped recipe: 3.5, all).
    p.add_argument("--epochs", type=float, default=0.6)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--freeze-layers", type=int, default=3)
    p.add_argument("--eval-steps", type=int, default=75)
    p.add_argument("--coverage", type=float, default=0.95)
    p.add_argument("--logits", default=None, help="re-score a saved logits.npz instead of training")
    args = p.parse_args(argv)
    path = Path(args.logits) if args.logits else train_and_predict(args)
    print(write_report(np.load(path), args.coverage, RESULTS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
