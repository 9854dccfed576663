"""The HTTP API on tiny models, in process: answers equal PEFT's, errors have the documented shape."""

from __future__ import annotations

import pytest
import torch
from factories import openai_error as _error
from factories import peft_logits, publish_cls_adapter, tiny_bert_base
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from adapters.registry import Registry
from service.app import create_app
from service.config import Settings

TEXTS = ["great movie", "dull boring w1 w2 w3", "w5"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    base_dir = tiny_bert_base(root / "base")
    registry = Registry(root / "registry")
    oracles = {
        "sentiment": publish_cls_adapter(registry, base_dir, root / "work", "sentiment", num_labels=2, seed=1),
        "intent": publish_cls_adapter(registry, base_dir, root / "work", "intent", num_labels=5, seed=2, r=8),
        "topic": publish_cls_adapter(registry, base_dir, root / "work", "topic", num_labels=3, seed=3,
                                     targets=["query", "value"]),
    }
    settings = Settings(registry=str(root / "registry"), encoder_base=str(base_dir), decoder_base="",
                        watch_interval_s=0, max_gpu_adapters=4, max_inputs=8, max_input_chars=200)
    return settings, oracles, AutoTokenizer.from_pretrained(base_dir), root


@pytest.fixture(scope="module")
def client(world):
    with TestClient(create_app(world[0])) as c:
        yield c


def test_classify_equals_peft_per_adapter(client, world):
    _, oracles, tokenizer, _ = world
    for name, model in oracles.items():
        resp = client.post("/v1/classify", json={"adapter": name, "inputs": TEXTS, "top_k": 2})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["adapter"] == name and body["version"] == 1
        for result, logits in zip(body["results"], peft_logits(model, tokenizer, TEXTS), strict=True):
            probs = torch.softmax(logits, -1)
            got = torch.tensor(list(result["scores"].values()))
            assert torch.allclose(got, probs, atol=1e-4), (name, got, probs)
            assert result["label"] == f"LABEL_{int(probs.argmax())}"
            assert len(result["top"]) == 2 and result["top"][0]["label"] == result["label"]


def test_single_string_input_and_base_model(client, world):
    resp = client.post("/v1/classify", json={"adapter": "sentiment@1", "inputs": "great movie"})
    assert resp.status_code == 200 and len(resp.json()["results"]) == 1
    base_id = world[0].encoder_base
    resp = client.post("/v1/classify", json={"adapter": base_id, "inputs": "great movie"})
    assert resp.status_code == 200 and resp.json()["version"] is None


@pytest.mark.parametrize("ctype", ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data; b=x",
                                   None])
def test_only_json_bodies_are_accepted(client, ctype):
    """A page in a browser can POST forms and text/plain anywhere without a preflight: such POSTs are 415
    and change nothing, so no page can load adapters or move aliases on a local server with auth off."""
    body = '{"adapter":"sentiment"}'
    before = client.get("/v1/adapters").json()
    headers = {"origin": "http://evil.example"} | ({"content-type": ctype} if ctype else {})
    resp = client.post("/v1/adapters", content=body, headers=headers)
    assert _error(resp, 415)["code"] == "unsupported_media_type"
    assert "access-control-allow-origin" not in resp.headers
    assert client.get("/v1/adapters").json() == before
    classify = '{"adapter":"sentiment","inputs":["great movie"]}'
    for ok in ("application/json", "application/json; charset=utf-8", "application/vnd.api+json"):
        assert client.post("/v1/classify", content=classify, headers={"content-type": ok}).status_code == 200


def test_refs_and_texts_are_bounded_before_use(client):
    """A ref is bounded (length, no whitespace/control characters) at the schema: 422 that does not echo it;
    a text that is not valid Unicode (a lone surrogate) is a 400 naming the input, never a 5xx."""
    huge = "sentiment@" + "x" * 100_000
    resp = client.post("/v1/classify", json={"adapter": huge, "inputs": "x"})
    assert _error(resp, 422)["param"] == "adapter" and len(resp.text) < 2_000
    _error(client.post("/v1/classify", json={"adapter": "senti ment", "inputs": "x"}), 422)
    lone = '{"adapter": "sentiment", "inputs": ["ok", "a\\ud800b"]}'  # JSON may escape a lone surrogate
    err = _error(client.post("/v1/classify", content=lone, headers={"content-type": "application/json"}), 400)
    assert err["param"] == "inputs[1]" and "lone surrogate" in err["message"]


def test_errors_have_openai_shape(client):
    assert _error(client.post("/v1/classify", json={"adapter": "nope", "inputs": "x"}), 404)["type"] == "not_found_error"
    _error(client.post("/v1/classify", json={"adapter": "../etc", "inputs": "x"}), 404)
    _error(client.post("/v1/classify", content="{not json", headers={"content-type": "application/json"}), 400)
    _error(client.post("/v1/classify", json={"inputs": "x"}), 422)
    _error(client.post("/v1/classify", json={"adapter": "sentiment", "inputs": []}), 400)
    _error(client.post("/v1/classify", json={"adapter": "sentiment", "inputs": ["x"] * 9}), 413)
    _error(client.post("/v1/classify", json={"adapter": "sentiment", "inputs": "x" * 201}), 413)
    _error(client.post("/v1/classify", json={"adapter": "sentiment", "inputs": "x", "top_k": 0}), 422)
    _error(client.get("/v1/nothing-here"), 404)


def test_health_ready_models_metrics(client, world):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    models = client.get("/v1/models").json()
    ids = {m["id"]: m for m in models["data"]}
    assert world[0].encoder_base in ids
    assert ids["sentiment"]["parent"] == world[0].encoder_base
    text = client.get("/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "loraswap_requests" in names or "loraswap_requests_total" in names


def test_load_unload_by_path_and_registry(client, world):
    _, _, _, root = world
    listing = client.get("/v1/adapters").json()["data"]
    assert {row["name"] for row in listing} >= {"sentiment", "intent", "topic"}
    resp = client.post("/v1/adapters", json={"adapter": "topic"})
    assert resp.status_code == 200 and resp.json()["version"] == 1
    assert client.get("/v1/adapters/topic").json()["resident"]["tier"] == "device"
    assert client.delete("/v1/adapters/topic").status_code == 200
    _error(client.post("/v1/classify", json={"adapter": "topic", "inputs": "x"}), 404)
    _error(client.delete("/v1/adapters/topic"), 404)
    resp = client.post("/v1/load_lora_adapter", json={"lora_name": "topic", "lora_path": str(root / "registry" / "topic" / "1")})
    assert resp.status_code == 200, resp.text
    assert client.post("/v1/classify", json={"adapter": "topic", "inputs": "x"}).status_code == 200
    _error(client.post("/v1/adapters", json={"path": str(root / "nowhere")}), 422)
    _error(client.post("/v1/adapters", json={}), 422)


def test_more_adapters_than_slots_evicts_lru(client, world):
    # 4 slots, 3 adapters + re-loads: every answer stays right while slots are recycled.
    _, oracles, tokenizer, _ = world
    for _ in range(3):
        for name, model in oracles.items():
            body = client.post("/v1/classify", json={"adapter": name, "inputs": ["w7 w8"]}).json()
            want = torch.softmax(peft_logits(model, tokenizer, ["w7 w8"])[0], -1)
            assert torch.allclose(torch.tensor(list(body["results"][0]["scores"].values())), want, atol=1e-4)


def test_startup_builds_route_state_so_first_requests_do_not(world, monkeypatch):
    """FastAPI builds a router's route state (one model field per parameter and response) on the router's
    first request; the app's startup warm-up must have done it for every router before any client comes."""
    import fastapi.routing as routing

    real, calls = routing.create_model_field, []
    monkeypatch.setattr(routing, "create_model_field", lambda *a, **k: calls.append(a) or real(*a, **k))
    with TestClient(create_app(world[0])) as c:
        built_at_startup = len(calls)
        assert c.get("/v1/adapters").status_code == 200
        assert c.post("/v1/classify", json={"adapter": "sentiment", "inputs": "w5"}).status_code == 200
        assert c.post("/v1/adapters", json={"adapter": "topic"}).status_code == 200
        assert c.get("/v1/models").status_code == 200
    assert built_at_startup > 0 and len(calls) == built_at_startup


def test_cors_is_opt_in(world):
    """No CORS headers unless an origin is listed; a listed origin's preflighted JSON POST is allowed."""
    settings = world[0].model_copy(update={"cors_origins": ["https://app.example"]})
    with TestClient(create_app(settings)) as client:
        pre = client.options("/v1/classify", headers={"origin": "https://app.example",
                                                      "access-control-request-method": "POST",
                                                      "access-control-request-headers": "content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
        other = client.get("/v1/models", headers={"origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
