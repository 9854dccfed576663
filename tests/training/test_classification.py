"""Train -> evaluate -> publish a tiny classification adapter, and check every artefact it leaves behind."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from adapters.bases import load_base
from adapters.fingerprint import describe_base
from adapters.format import read_adapter, validate_adapter
from adapters.registry import Registry
from tests.training.helpers import (
    metrics_json,
    read_jsonl,
    recipe,
    run_cli,
    scalars,
    single_thread,  # noqa: F401  (autouse)
)
from training.cli import main as training_main
from training.cli import run

LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def encoder(tiny_encoder, tmp_path_factory):
    """tiny_encoder re-initialised (seeded) with larger weights. With the default init the 8-step adapter
    predicts one class for every row, which would make the metric comparisons below nearly vacuous."""
    from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert-wide")
    config = AutoConfig.from_pretrained(tiny_encoder)
    config.initializer_range = 0.3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_encoder).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def published(encoder, sst2_slice, tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    r = recipe(encoder, sst2_slice, root / "run", registry=str(root / "registry"))
    outcome = run(r, publish=True)
    reg = Registry(root / "registry")
    return {"recipe": r, "outcome": outcome, "registry": root / "registry", "run": root / "run",
            "folder": reg.fetch(*reg.resolve("tiny"))}


def test_published_folder_is_complete_and_valid(published, encoder, sst2_slice):
    folder, r = published["folder"], published["recipe"]
    assert published["outcome"]["published"] == "tiny@1"
    for rel in ("adapter_config.json", "adapter_model.safetensors", "loraswap.json", "eval/metrics.json",
                "eval/report.md", "eval/confusion_matrix.png"):
        assert (folder / rel).is_file(), rel
    assert (folder / "eval" / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The project's own validation, against the base exactly as the server would load it.
    base, _ = load_base(str(encoder), "classification")
    info = describe_base(base, str(encoder), "classification")
    weights = read_adapter(folder, info)
    manifest = validate_adapter(folder, info)
    assert weights.lora and set(weights.head) >= {"classifier.weight", "classifier.bias"}
    assert weights.head["classifier.weight"].shape == (2, 32)

    assert manifest.name == "tiny" and manifest.version == 1 and manifest.task == "classification"
    assert manifest.labels == LABELS
    assert manifest.lora.r == 4 and manifest.lora.alpha == 8
    assert {"eval/metrics.json", "eval/report.md", "eval/confusion_matrix.png"} <= set(manifest.files)
    digest = hashlib.sha256(b"".join((sst2_slice / f"{s}.jsonl").read_bytes()
                                     for s in ("train", "validation", "test"))).hexdigest()
    assert manifest.dataset.sha256 == digest
    assert manifest.dataset.rows == {"train": 200, "validation": 60, "test": 60}
    assert manifest.training["recipe"] == r.to_dict()
    assert manifest.training["seed"] == r.seed == 42
    assert manifest.training["steps"] == 8
    # The headline numbers of the manifest are those of eval/metrics.json.
    splits = metrics_json(folder)["splits"]
    for split in ("validation", "test"):
        for key in ("accuracy", "f1_macro", "loss"):
            assert manifest.metrics[f"{split}_{key}"] == pytest.approx(splits[split][key], abs=1e-6)
    report = (folder / "eval" / "report.md").read_text()
    assert "| test | 60 |" in report and "| validation | 60 |" in report
    assert "](confusion_matrix.png)" in report and digest in report


def test_run_folder_keeps_the_adapter_and_checkpoints(published):
    run_dir = published["run"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "checkpoint-4").is_dir() and (run_dir / "checkpoint-8").is_dir()
    assert published["outcome"]["report"] == str(run_dir / "eval" / "report.md")


def test_tensorboard_has_training_and_eval_scalars(published):
    tb = scalars(published["run"] / "tensorboard")
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "eval/loss", "eval/accuracy",
                "eval/f1_macro"):
        assert tb.get(tag), f"no {tag} in {sorted(tb)}"
    assert [s for s, _ in tb["train/loss"]] == [1, 2, 4, 6, 8]  # logging_first_step + every 2 steps
    assert [s for s, _ in tb["eval/accuracy"]][:2] == [4, 8]
    lrs = [v for _, v in tb["train/learning_rate"]]
    assert lrs[0] == pytest.approx(5e-3) and all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert all(math.isfinite(v) and v > 0 for _, v in tb["train/grad_norm"])


def _sklearn_scores(folder, base_dir, rows, max_length):
    """Predictions of the published adapter loaded with PEFT directly, scored by scikit-learn."""
    from peft import PeftModel
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length, padding=True,
                    pad_to_multiple_of=8, return_tensors="pt")
    with torch.no_grad():
        preds = model(**enc).logits.argmax(-1).tolist()
    y_true = [LABELS.index(r["label"]) for r in rows]
    return {"accuracy": accuracy_score(y_true, preds),
            "f1_macro": f1_score(y_true, preds, labels=[0, 1], average="macro", zero_division=0),
            "confusion_matrix": confusion_matrix(y_true, preds, labels=[0, 1]).tolist(), "rows": len(rows)}


def _assert_same(expected: dict, got: dict, where: str) -> None:
    assert got["rows"] == expected["rows"], where
    assert got["confusion_matrix"] == expected["confusion_matrix"], where
    for key in ("accuracy", "f1_macro"):
        assert abs(got[key] - expected[key]) <= 1e-9, f"{where}: {key} {got[key]} != {expected[key]}"


def test_eval_metrics_match_scikit_learn(published, encoder, sst2_slice):
    written = metrics_json(published["folder"])["splits"]
    predicted = set()
    for split in ("validation", "test"):
        expected = _sklearn_scores(published["folder"], encoder, read_jsonl(sst2_slice / f"{split}.jsonl"),
                                   published["recipe"].max_length)
        _assert_same(expected, written[split], f"training eval, {split}")
        assert sum(map(sum, expected["confusion_matrix"])) == 60
        predicted |= {j for row in expected["confusion_matrix"] for j, n in enumerate(row) if n}
    assert predicted == {0, 1}, "the adapter predicts a single class: the comparison would prove little"


def test_loraswap_eval_gives_the_same_numbers(published, sst2_slice, tmp_path):
    written = metrics_json(published["folder"])["splits"]
    proc = run_cli("eval", published["folder"], "--data", sst2_slice, "--output-dir", tmp_path / "cli")
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout[proc.stdout.index('{\n  "adapter"'):])
    assert printed["metrics"]["test_accuracy"] == pytest.approx(written["test"]["accuracy"], abs=1e-6)
    by_cli = metrics_json(tmp_path / "cli")["splits"]
    # In process, resolving NAME@VERSION in the registry instead of a folder.
    args = ["eval", "tiny@1", "--registry", str(published["registry"]), "--data", str(sst2_slice),
            "--output-dir", str(tmp_path / "inproc")]
    assert training_main(args) == 0
    in_process = metrics_json(tmp_path / "inproc")["splits"]
    for split in ("validation", "test"):
        _assert_same(written[split], by_cli[split], f"loraswap eval, {split}")
        _assert_same(written[split], in_process[split], f"eval via registry, {split}")
    assert (tmp_path / "cli" / "eval" / "confusion_matrix.png").is_file()


def test_calibration_in_manifest_and_report(published, encoder, sst2_slice):
    """Temperature and default min_score recomputed from the published adapter's validation logits (PEFT)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from training.calibration import confidence, fit_temperature, threshold_for_coverage

    folder, r = published["folder"], published["recipe"]
    model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(encoder, num_labels=2), str(folder)).eval()
    rows = read_jsonl(sst2_slice / "validation.jsonl")
    enc = AutoTokenizer.from_pretrained(encoder)([x["text"] for x in rows], truncation=True,
                                                 max_length=r.max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits.numpy()
    labels = [LABELS.index(x["label"]) for x in rows]
    temperature = fit_temperature(logits, labels)
    manifest = read_adapter(folder).manifest
    assert manifest.calibration.temperature == pytest.approx(temperature, rel=1e-3)
    assert manifest.min_score == pytest.approx(
        threshold_for_coverage(confidence(logits, "temperature", temperature), r.abstain_coverage), abs=1e-4)
    calibration = metrics_json(folder)["calibration"]
    assert calibration["splits"]["validation"]["in_scope_answered"] >= r.abstain_coverage
    report = (folder / "eval" / "report.md").read_text()
    assert "](reliability.png)" in report and "](coverage.png)" in report
    assert {"eval/reliability.png", "eval/coverage.png"} <= set(manifest.files)
