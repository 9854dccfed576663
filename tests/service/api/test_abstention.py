"""/v1/classify with a calibrated manifest: scores use its temperature, `min_score` abstains (PEFT oracle)."""

from __future__ import annotations

import pytest
import torch
from factories import openai_error, peft_logits, publish_cls_adapter, tiny_bert_base
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from adapters.registry import Registry
from service.app import create_app
from service.config import Settings

TEXTS = ["great movie", "dull boring w1 w2 w3", "w5", "loved w7 w9", "w3 w4"]
TEMPERATURE = 2.5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("abstain")
    base_dir = tiny_bert_base(root / "base")
    registry = Registry(root / "registry")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    plain = publish_cls_adapter(registry, base_dir, root / "work", "plain", num_labels=5, seed=4)
    # the default min_score sits between the calibrated top scores, so some rows abstain and some do not
    calibrated = publish_cls_adapter(registry, base_dir, root / "work", "calibrated", num_labels=5, seed=5)
    tops = sorted(float(torch.softmax(z / TEMPERATURE, -1).max()) for z in peft_logits(calibrated, tokenizer, TEXTS))
    assert tops[0] < tops[-1], "the oracle needs distinct confidences"
    min_score = (tops[1] + tops[2]) / 2
    folder = registry.fetch("calibrated", 1)
    from adapters.manifest import Manifest

    manifest = Manifest.load(folder)
    assert manifest.calibration is None and manifest.min_score is None  # import writes no calibration
    publish_cls_adapter(registry, base_dir, root / "work", "calibrated", num_labels=5, seed=5, version=2,
                        manifest_update={"calibration": {"temperature": TEMPERATURE}, "min_score": min_score})
    settings = Settings(registry=str(root / "registry"), encoder_base=str(base_dir), decoder_base="",
                        watch_interval_s=0, max_gpu_adapters=4, max_inputs=8, max_input_chars=200)
    oracle = {"plain": peft_logits(plain, tokenizer, TEXTS), "calibrated": peft_logits(calibrated, tokenizer, TEXTS)}
    with TestClient(create_app(settings)) as client:
        yield client, oracle, min_score


def _classify(client, **body):
    resp = client.post("/v1/classify", json={"inputs": TEXTS, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()["results"]


def test_manifest_defaults_temperature_and_abstention(world):
    client, oracle, min_score = world
    abstained = 0
    for result, logits in zip(_classify(client, adapter="calibrated@2"), oracle["calibrated"], strict=True):
        probs = torch.softmax(logits / TEMPERATURE, -1)
        assert torch.allclose(torch.tensor(list(result["scores"].values())), probs, atol=1e-4)
        below = float(probs.max()) < min_score
        assert result["abstained"] is below and result["score"] == pytest.approx(float(probs.max()), abs=1e-4)
        assert result["label"] == (None if below else f"LABEL_{int(probs.argmax())}")
        assert result["top"][0]["label"] == f"LABEL_{int(probs.argmax())}"  # scores and top stay present
        abstained += below
    assert 0 < abstained < len(TEXTS)


def test_request_min_score_overrides_the_manifest(world):
    client, oracle, _ = world
    assert not any(r["abstained"] for r in _classify(client, adapter="calibrated@2", min_score=0))
    assert all(r["label"] is None for r in _classify(client, adapter="calibrated@2", min_score=1))
    # an adapter without calibration: plain softmax, abstains only when asked
    results = _classify(client, adapter="plain")
    assert not any(r["abstained"] for r in results)
    for result, logits in zip(results, oracle["plain"], strict=True):
        assert torch.allclose(torch.tensor(list(result["scores"].values())), torch.softmax(logits, -1), atol=1e-4)
    cut = sorted(r["score"] for r in results)[2]
    for result in _classify(client, adapter="plain", min_score=cut):
        assert result["abstained"] is (result["score"] < cut)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "high"])
def test_bad_min_score_is_a_422(world, bad):
    client, _, _ = world
    resp = client.post("/v1/classify", json={"adapter": "calibrated@2", "inputs": TEXTS, "min_score": bad})
    assert openai_error(resp, 422, "validation_error")["param"] == "min_score"
