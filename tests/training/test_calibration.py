"""training/calibration.py: temperature recovery on synthetic logits, thresholds, ECE, scores."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp, softmax

from training import calibration as cal


def _synthetic(n: int, classes: int, true_t: float, seed: int = 0):
    """Labels drawn from softmax(g); the model reports g * true_t, so the right temperature is true_t."""
    rng = np.random.default_rng(seed)
    g = rng.normal(0.0, 2.5, size=(n, classes))
    p = softmax(g, axis=-1)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return g * true_t, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_recovers_known_temperature(true_t):
    logits, labels = _synthetic(20000, 8, true_t)
    assert cal.fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)


def test_temperature_lowers_ece_of_overconfident_logits():
    logits, labels = _synthetic(20000, 8, 3.0, seed=1)
    t = cal.fit_temperature(logits, labels)
    before = cal.expected_calibration_error(cal.probabilities(logits), labels)
    after = cal.expected_calibration_error(cal.probabilities(logits, t), labels)
    assert before > 0.1 and after < 0.02


def test_ece_of_a_hand_made_case():
    # two rows at confidence 0.9, one right and one wrong: |0.5 - 0.9| = 0.4 in their bin
    probs = np.array([[0.9, 0.1], [0.9, 0.1]])
    assert cal.expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.4)


def test_threshold_keeps_exactly_the_share():
    scores = np.random.default_rng(2).permutation(np.arange(100) / 100.0)
    t = cal.threshold_for_coverage(scores, 0.95)
    assert t == pytest.approx(0.05) and (scores >= t).sum() == 95
    assert cal.threshold_for_coverage(scores, 1.0) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        cal.threshold_for_coverage(scores, 0.0)


def test_scores():
    z = np.array([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert np.allclose(cal.confidence(z, "max_softmax", 5.0), softmax(z, -1).max(-1))  # ignores T
    assert np.allclose(cal.confidence(z, "temperature", 2.0), softmax(z / 2, -1).max(-1))
    assert np.allclose(cal.confidence(z, "energy", 2.0), 2.0 * logsumexp(z / 2, -1))
    p = softmax(z, -1)
    assert np.allclose(cal.confidence(z, "margin"), [p[0, 0] - p[0, 1], 0.0])
    with pytest.raises(ValueError):
        cal.confidence(z, "entropy")


def test_coverage_curve():
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([1, 1, 0, 0])
    curve = {round(p["coverage"], 2): p["accuracy"] for p in cal.coverage_curve(scores, correct)}
    assert curve[0.5] == 1.0 and curve[1.0] == 0.5
