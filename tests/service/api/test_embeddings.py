"""POST /v1/embeddings in process on a tiny BERT: vectors equal PEFT + pooling, the OpenAI shape (base64,
dimensions, token ids, usage), the documented 4xx that change nothing, /v1/models and per-adapter metrics."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from factories import openai_error as _error
from factories import publish_cls_adapter, publish_embedding_adapter, tiny_bert_base
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModel, AutoTokenizer

from adapters.pooling import Pooling
from adapters.registry import Registry
from service.app import create_app
from service.config import Settings

TEXTS = ["great movie", "dull boring w1 w2 w3", "w5"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed-api")
    base_dir = tiny_bert_base(root / "base")
    registry = Registry(root / "registry")
    publish_cls_adapter(registry, base_dir, root / "work", "sentiment", num_labels=2, seed=1)
    oracle = publish_embedding_adapter(registry, base_dir, root / "work", "search", seed=5)
    settings = Settings(registry=str(root / "registry"), encoder_base=str(base_dir), decoder_base="",
                        watch_interval_s=0, max_gpu_adapters=4, max_inputs=8, max_input_chars=200)
    return settings, oracle, AutoModel.from_pretrained(base_dir).eval(), AutoTokenizer.from_pretrained(base_dir)


@pytest.fixture(scope="module")
def client(world):
    with TestClient(create_app(world[0])) as c:
        yield c


def _want(model, tokenizer, texts):
    """PEFT (or the bare base), one text at a time, then the tiny base's pooling (no modules.json: mean)."""
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer([text], return_tensors="pt")
            out.append(Pooling()(model(**enc).last_hidden_state, enc["attention_mask"])[0])
    return torch.stack(out)


def _post(client, **body):
    return client.post("/v1/embeddings", json=body)


def test_adapter_and_base_vectors_equal_peft(client, world):
    settings, oracle, bare, tokenizer = world
    for model_id, model in (("search", oracle), ("search@1", oracle), (settings.encoder_base, bare)):
        resp = _post(client, model=model_id, input=TEXTS)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2]
        got = torch.tensor([d["embedding"] for d in body["data"]])
        torch.testing.assert_close(got, _want(model, tokenizer, TEXTS), atol=1e-4, rtol=1e-4)
        tokens = sum(len(ids) for ids in tokenizer(TEXTS)["input_ids"])
        assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert _post(client, model="search", input=TEXTS).json()["model"] == "search"


def test_long_texts_are_cut_at_the_bases_max_seq_length(client, world):
    _, oracle, _, tokenizer = world
    engine = client.app.state.ctx.engines["embedding"]
    before = engine.pooling
    engine.pooling = Pooling(max_seq_length=4)  # as a sentence_bert_config.json would say
    try:
        got = torch.tensor(_post(client, model="search", input=TEXTS[1]).json()["data"][0]["embedding"])
    finally:
        engine.pooling = before
    enc = tokenizer([TEXTS[1]], truncation=True, max_length=4, return_tensors="pt")
    assert enc["input_ids"].shape[1] == 4 < len(tokenizer(TEXTS[1])["input_ids"])
    with torch.no_grad():
        want = Pooling()(oracle(**enc).last_hidden_state, enc["attention_mask"])[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_base64_dimensions_and_token_ids(client, world):
    _, oracle, _, tokenizer = world
    want = _want(oracle, tokenizer, TEXTS[:1])[0]
    body = _post(client, model="search", input=TEXTS[0], encoding_format="base64", dimensions=5).json()
    got = torch.from_numpy(np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4").copy())
    torch.testing.assert_close(got, torch.nn.functional.normalize(want[:5], dim=0), atol=1e-5, rtol=1e-5)
    assert abs(float(got.norm()) - 1) < 1e-5
    ids = tokenizer(TEXTS)["input_ids"]
    for given in (ids, ids[0]):
        body = _post(client, model="search", input=given).json()
        got = torch.tensor([d["embedding"] for d in body["data"]])
        n = len(given) if isinstance(given[0], list) else 1
        torch.testing.assert_close(got, _want(oracle, tokenizer, TEXTS[:n]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("body, status, param", [
    ({"input": []}, 400, "input"),
    ({"input": ["x"] * 9}, 413, "input"),
    ({"input": [[5]] * 9}, 413, "input"),
    ({"input": ["x" * 201]}, 413, "input"),
    ({"input": [[5, 10**6]]}, 400, "input"),
    ({"input": [[]]}, 400, "input"),
    ({"input": "x", "dimensions": 33}, 400, "dimensions"),
    ({"input": "x", "dimensions": 0}, 422, None),
    ({"input": "x", "encoding_format": "int8"}, 422, None),
])  # fmt: skip
def test_bad_input_is_a_4xx(client, body, status, param):
    err = _error(_post(client, model="search", **body), status)
    if param:
        assert err["param"] == param


def test_wrong_task_model_is_409_both_ways(client):
    before = client.get("/v1/adapters").json()
    assert _error(_post(client, model="sentiment", input="x"), 409)["message"].startswith("adapter sentiment@1 is a classification adapter")
    resp = client.post("/v1/classify", json={"adapter": "search", "inputs": "x"})
    assert "embedding adapter" in _error(resp, 409)["message"]
    assert _error(_post(client, model="nope", input="x"), 404)
    after = client.get("/v1/adapters").json()
    assert [(a["name"], a["version"]) for a in after["data"]] == [(a["name"], a["version"]) for a in before["data"]]
    # Once served, the check is the lease's (no registry read), and still a 409.
    assert client.post("/v1/classify", json={"adapter": "sentiment", "inputs": "x"}).status_code == 200
    assert client.post("/v1/embeddings", json={"model": "search", "input": "x"}).status_code == 200
    assert "classification adapter" in _error(_post(client, model="sentiment", input="x"), 409)["message"]
    assert "embedding adapter" in _error(client.post("/v1/classify", json={"adapter": "search", "inputs": "x"}),
                                         409)["message"]


def test_models_list_embedding_adapters_and_metrics_label_the_task(client):
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["search"]["task"] == "embedding" and models["sentiment"]["task"] == "classification"
    assert models["search"]["parent"] == models["sentiment"]["parent"]
    _post(client, model="search", input="x")
    text = client.get("/metrics").text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "loraswap_requests_total" and s.labels.get("adapter") == "search"]
    assert samples and all(s.labels["task"] == "embedding" for s in samples)
