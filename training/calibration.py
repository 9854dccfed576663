"""Calibrated confidence for classifiers: a temperature fitted on validation logits (Guo et al. 2017), the
confidence scores an abstention threshold can use, the threshold that keeps a share of in-scope answers,
and the numbers the report shows (ECE, reliability bins, accuracy/coverage curve).

Pure numpy/scipy on logits: training calls it after evaluation; benchmarks/openset.py compares the scores.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp, softmax

SCORES = ("max_softmax", "temperature", "energy", "margin")


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / T)."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=-1)
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising validation NLL. Searched over log T (T in [0.05, 20]), where NLL is smooth."""
    labels = np.asarray(labels, dtype=np.int64)
    res = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))),
                          bounds=(np.log(0.05), np.log(20.0)), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(res.x))


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=-1)


def confidence(logits: np.ndarray, kind: str, temperature: float = 1.0) -> np.ndarray:
    """Per-row confidence, higher = more sure. max_softmax ignores T (the baseline); temperature is the
    top calibrated probability (what the server compares `min_score` with); energy is T·logsumexp(z/T)
    (Liu et al. 2020, negated free energy); margin is the gap between the two top calibrated probabilities."""
    z = np.asarray(logits, dtype=np.float64)
    if kind == "max_softmax":
        return probabilities(z).max(-1)
    if kind == "temperature":
        return probabilities(z, temperature).max(-1)
    if kind == "energy":
        return temperature * logsumexp(z / temperature, axis=-1)
    if kind == "margin":
        top2 = np.sort(probabilities(z, temperature), axis=-1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    raise ValueError(f"unknown score {kind!r}: expected one of {SCORES}")


def threshold_for_coverage(scores: np.ndarray, coverage: float) -> float:
    """The largest threshold t with at least `coverage` of the (in-scope) scores >= t."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError("coverage must be in (0, 1]")
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    k = int(np.floor((1.0 - coverage) * len(ordered) + 1e-9))
    return float(ordered[min(k, len(ordered) - 1)])


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: the bin-weighted |accuracy - mean confidence| over equal-width confidence bins."""
    table = reliability(probs, labels, bins)
    n = sum(row["count"] for row in table)
    return float(sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in table) / max(n, 1))


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    """Non-empty equal-width bins of top-label confidence: count, mean confidence, accuracy."""
    conf = probs.max(-1)
    correct = probs.argmax(-1) == np.asarray(labels)
    index = np.minimum((conf * bins).astype(int), bins - 1)
    return [{"low": b / bins, "count": int((index == b).sum()), "confidence": float(conf[index == b].mean()),
             "accuracy": float(correct[index == b].mean())} for b in range(bins) if (index == b).any()]


def coverage_curve(scores: np.ndarray, correct: np.ndarray, points: int = 21) -> list[dict[str, float]]:
    """Accuracy on the answered rows when only the most confident `coverage` share is answered."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    hits = np.cumsum(np.asarray(correct)[order])
    out = []
    for coverage in np.linspace(0.05, 1.0, points - 1):
        k = max(1, int(round(coverage * len(order))))
        out.append({"coverage": float(coverage), "accuracy": float(hits[k - 1] / k)})
    return out


def calibrate(metrics: dict, labels: list[str], coverage: float, out_of_scope_label: str | None = None) -> dict:
    """Temperature and default `min_score` from the validation split's logits (evaluate.evaluate_splits keeps
    them), and per split: ECE before/after, reliability bins, accuracy/coverage curve, answered share.
    Rows of `out_of_scope_label` should abstain: they are left out when the threshold is chosen and count
    as caught when abstained on or given that label."""
    val = metrics["validation"]
    temperature = fit_temperature(val["logits"], val["label_ids"])
    oos = labels.index(out_of_scope_label) if out_of_scope_label in labels else None

    def in_scope(label_ids):
        return np.ones(len(label_ids), bool) if oos is None else label_ids != oos

    val_scores = confidence(val["logits"], "temperature", temperature)
    min_score = threshold_for_coverage(val_scores[in_scope(val["label_ids"])], coverage)
    splits = {}
    for split, m in metrics.items():
        logits, label_ids = m["logits"], m["label_ids"]
        probs_before, probs_after = probabilities(logits), probabilities(logits, temperature)
        scores, inside = probs_after.max(-1), in_scope(label_ids)
        answered = scores >= min_score
        correct = probs_after.argmax(-1) == label_ids
        row = {"ece_before": expected_calibration_error(probs_before, label_ids),
               "ece_after": expected_calibration_error(probs_after, label_ids),
               "reliability_before": reliability(probs_before, label_ids),
               "reliability_after": reliability(probs_after, label_ids),
               "in_scope_answered": float(answered[inside].mean()),
               "accuracy_answered": float(correct[inside & answered].mean()) if (inside & answered).any() else None,
               "curve": coverage_curve(scores[inside], correct[inside])}
        if oos is not None and (~inside).any():
            caught = ~answered[~inside] | (probs_after[~inside].argmax(-1) == oos)
            row["out_of_scope_caught"] = float(caught.mean())
        splits[split] = row
    return {"temperature": temperature, "min_score": min_score, "coverage": coverage,
            "out_of_scope_label": out_of_scope_label, "splits": splits}
