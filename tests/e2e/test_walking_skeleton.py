"""Issue 4's path end to end: `loraswap train` on an SST-2 slice → registry → real server → HTTP answer
equal to the same adapter run through PEFT directly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from live import live_server
from peft import PeftModel

from adapters.bases import load_base
from adapters.manifest import Manifest

LORASWAP = str(Path(sys.executable).with_name("loraswap"))
TEXTS = ["I loved this film", "a dull, boring mess", "great movie"]

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("skeleton")
    registry = root / "registry"
    cmd = [LORASWAP, "train", "--task", "classification", "--data", str(data_dir / "sst2"), "--name", "sentiment",
           "--registry", str(registry), "--output-dir", str(root / "run"), "--max-train-rows", "256",
           "--max-steps", "12", "--batch-size", "16", "--max-length", "32", "--eval-steps", "6",
           "--set", "max_eval_rows=64"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return registry


def test_train_publishes_a_valid_version(trained):
    folder = trained / "sentiment" / "1"
    assert {"adapter_config.json", "adapter_model.safetensors", "loraswap.json"} <= {p.name for p in folder.iterdir()}
    manifest = json.loads((folder / "loraswap.json").read_text())
    assert manifest["task"] == "classification" and manifest["labels"] == ["negative", "positive"]
    assert 0.0 <= manifest["metrics"]["validation_accuracy"] <= 1.0
    listed = subprocess.run([LORASWAP, "adapter", "list", "--registry", str(trained)], capture_output=True, text=True)
    assert listed.returncode == 0 and "sentiment" in listed.stdout


def test_served_answer_equals_peft(trained):
    with live_server(trained, env={"LORASWAP_DECODER_BASE": ""}) as url:
        resp = httpx.post(f"{url}/v1/classify", json={"adapter": "sentiment", "inputs": TEXTS}, timeout=60)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["adapter"] == "sentiment" and body["version"] == 1
        missing = httpx.post(f"{url}/v1/classify", json={"adapter": "nope", "inputs": "x"}, timeout=60)
        assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
        bad = httpx.post(f"{url}/v1/classify", content="{", headers={"content-type": "application/json"}, timeout=60)
        assert bad.status_code == 400
    want = _peft_probs(trained / "sentiment" / "1")
    got = torch.tensor([[r["scores"]["negative"], r["scores"]["positive"]] for r in body["results"]])
    assert torch.allclose(got, want, atol=1e-4), (got, want)


def _peft_probs(folder: Path) -> torch.Tensor:
    """PEFT's probabilities with the temperature training fitted and the manifest carries (served scores are
    calibrated: softmax(logits / T))."""
    base, tokenizer = load_base("all-MiniLM-L6-v2", "classification")
    model = PeftModel.from_pretrained(base, folder).eval()
    calibration = Manifest.load(folder).calibration
    assert calibration is not None  # a classification run always fits one
    with torch.no_grad():
        return torch.stack([torch.softmax(model(**tokenizer(t, return_tensors="pt")).logits[0] / calibration.temperature, -1)
                            for t in TEXTS])
