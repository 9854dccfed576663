"""Tenant isolation with auth on: /metrics needs a `metrics` (or `admin`) key and shows a key only the
adapters its globs allow; non-admin keys get a manifest without dataset, training details, file list or local
paths; errors do not reveal where the registry lives. With auth off (a local server) everything stays open."""

from __future__ import annotations

import json

import pytest
from factories import openai_error as _error
from factories import publish_cls_adapter, tiny_bert_base
from fastapi.testclient import TestClient
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from adapters.registry import Registry
from service.app import create_app
from service.config import Settings
from service.metrics import OTHER_ADAPTER, Metrics

INFER_ALL = "infer-all-key-01"  # infer, every adapter: drives the traffic
INFER_A = "infer-a-key-0001"  # infer, a* only
METRICS_A = "metrics-a-key-01"  # metrics, a* only
METRICS_ALL = "metrics-all-key1"  # metrics, every adapter
ADMIN = "admin-key-000001"  # admin, every adapter
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
PRIVATE = {"dataset": {"path": "/data/tenant-a/reviews.jsonl", "sha256": "0" * 64, "rows": {"train": 8}},
           "training": {"recipe": "/opt/recipes/tenant-a.yaml", "epochs": 3}}


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("isolation")
    base_dir = tiny_bert_base(root / "base")
    registry = Registry(root / "registry")
    publish_cls_adapter(registry, base_dir, root / "work", "alpha", num_labels=2, seed=1, manifest_update=PRIVATE)
    publish_cls_adapter(registry, base_dir, root / "work", "beta", num_labels=3, seed=2)
    keys = [{"key": INFER_ALL, "scopes": ["infer"]},
            {"key": INFER_A, "scopes": ["infer"], "adapters": ["a*"]},
            {"key": METRICS_A, "scopes": ["metrics"], "adapters": ["a*"]},
            {"key": METRICS_ALL, "scopes": ["metrics"]},
            {"key": ADMIN, "scopes": ["admin"]}]
    settings = Settings(registry=str(root / "registry"), encoder_base=str(base_dir), decoder_base="",
                        watch_interval_s=0, max_gpu_adapters=4, api_keys=json.dumps(keys))
    return settings, root


@pytest.fixture(scope="module")
def client(world):
    """Auth on, after real traffic: alpha loaded from a local path (its residency `source` is that path),
    requests to alpha, beta and the base model."""
    settings, root = world
    with TestClient(create_app(settings)) as c:
        loaded = c.post("/v1/adapters", json={"path": str(root / "registry" / "alpha" / "1")}, headers=bearer(ADMIN))
        assert loaded.status_code == 200, loaded.text
        for name in ("alpha", "beta", "alpha", settings.encoder_base):
            resp = c.post("/v1/classify", json={"adapter": name, "inputs": ["great movie"]}, headers=bearer(INFER_ALL))
            assert resp.status_code == 200, resp.text
        yield c


@pytest.fixture(scope="module")
def open_client(world):
    settings = world[0].model_copy(update={"api_keys": None, "api_keys_file": None, "auth_enabled": None})
    with TestClient(create_app(settings)) as c:
        assert not c.app.state.auth.enabled
        yield c


def _adapters_in(families) -> set[str]:
    return {s.labels["adapter"] for f in families for s in f.samples if "adapter" in s.labels}


# ---- /metrics ---------------------------------------------------------------------------------------------


def test_metrics_need_a_metrics_or_admin_key_only_when_auth_is_on(client, open_client):
    resp = open_client.get("/metrics")  # a local server with auth off: open, as before
    assert resp.status_code == 200 and "loraswap_requests_total" in resp.text
    assert _error(client.get("/metrics"), 401)["code"] == "missing_api_key"
    _error(client.get("/metrics", headers=bearer("not-a-real-key-123")), 401)
    assert _error(client.get("/metrics", headers=bearer(INFER_ALL)), 403)["code"] == "insufficient_scope"
    for key in (METRICS_A, METRICS_ALL, ADMIN):
        assert client.get("/metrics", headers=bearer(key)).status_code == 200, key
    assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200  # probes


def test_a_key_sees_only_its_adapters_series(client, world):
    base = world[0].encoder_base
    everything = client.get("/metrics", headers=bearer(METRICS_ALL)).text
    assert {"alpha", "beta", base} <= _adapters_in(text_string_to_metric_families(everything))
    body = client.get("/metrics", headers=bearer(METRICS_A)).text
    families = list(text_string_to_metric_families(body))
    seen = _adapters_in(families)
    assert {"alpha", base} <= seen and "beta" not in seen, seen
    requests = {s.labels["adapter"]: s.value for f in families if f.name == "loraswap_requests"
                for s in f.samples if s.name == "loraswap_requests_total"}
    assert requests["alpha"] == 2 and requests[base] == 1, requests
    assert "beta" not in body  # nor in vLLM's comma-joined LoRA lists or anywhere else
    assert {f.name for f in families} == {f.name for f in text_string_to_metric_families(everything)}


def test_openmetrics_is_filtered_too(client):
    resp = client.get("/metrics", headers={**bearer(METRICS_A), "Accept": OPENMETRICS})
    assert resp.headers["content-type"].startswith("application/openmetrics-text")
    seen = _adapters_in(parse_openmetrics(resp.text))
    assert "alpha" in seen and "beta" not in seen, seen


def test_hidden_names_leave_the_lora_lists_and_other_and_bases_stay():
    m = Metrics(always_labelled=["base-model"], max_adapter_labels=3)
    for name in ("base-model", "alpha", "beta", "gamma"):  # gamma is past the cap: counted as _other_
        m.observe_request(name, "generation", 200, 0.1)
    m.set_engine_state("generation", 2, 1, running_adapters=["alpha", "beta"], waiting_adapters=["beta"], max_lora=4)
    asked = []

    def visible(name: str) -> bool:
        asked.append(name)
        return name.startswith("a")

    families = {f.name: f for f in text_string_to_metric_families(m.exposition(visible=visible)[0].decode())}
    assert {s.labels["adapter"] for s in families["loraswap_requests"].samples} == {"base-model", "alpha",
                                                                                     OTHER_ADAPTER}
    (info,) = families["vllm:lora_requests_info"].samples
    assert info.labels == {"max_lora": "4", "running_lora_adapters": "alpha", "waiting_lora_adapters": ""}
    assert sorted(asked) == ["alpha", "beta"]  # once per name and scrape; bases and _other_ are never asked
    assert b"beta" in m.exposition()[0]  # no filter: everything


# ---- the adapter detail -----------------------------------------------------------------------------------


def _full_view(resp):
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["manifest"]["dataset"] == PRIVATE["dataset"] and body["manifest"]["training"] == PRIVATE["training"]
    assert "adapter_model.safetensors" in body["manifest"]["files"]
    return body


def test_only_non_admin_keys_get_a_redacted_manifest(client, open_client, world):
    resp = client.get("/v1/adapters/alpha", headers=bearer(INFER_A))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["manifest"]["name"] == "alpha" and body["manifest"]["lora"]["r"] == 4
    assert not {"dataset", "training", "files"} & set(body["manifest"]), body["manifest"]
    assert body["resident"]["tier"] == "device" and "source" not in body["resident"], body["resident"]
    assert "/data/tenant-a" not in resp.text and "/opt/recipes" not in resp.text
    listed = client.get("/v1/adapters", headers=bearer(INFER_A)).json()["data"]
    assert [row["name"] for row in listed] == ["alpha"] and "source" not in listed[0]
    # admin keys, and everyone on a server with auth off (its owner's), see it all
    path = str(world[1] / "registry" / "alpha" / "1")
    assert _full_view(client.get("/v1/adapters/alpha", headers=bearer(ADMIN)))["resident"]["source"] == path
    listed = {row["name"]: row for row in client.get("/v1/adapters", headers=bearer(ADMIN)).json()["data"]}
    assert listed["alpha"]["source"] == path
    _full_view(open_client.get("/v1/adapters/alpha"))


# ---- errors -----------------------------------------------------------------------------------------------


def test_not_found_names_the_adapter_not_the_registry(client, world):
    registry_dir = str(world[1] / "registry")
    answers = [client.post("/v1/classify", json={"adapter": "axe", "inputs": ["hi"]}, headers=bearer(INFER_A)),
               client.get("/v1/adapters/axe", headers=bearer(INFER_A)),
               client.post("/v1/adapters", json={"adapter": "axe"}, headers=bearer(ADMIN))]
    for resp in answers:
        message = _error(resp, 404)["message"]
        assert message == "adapter 'axe' not found in the registry", message
        assert registry_dir not in resp.text


def test_metrics_open_serves_every_adapter_without_a_key(world):
    """`metrics_open` (what the chart sets for the Inference Extension's endpoint picker, which sends no key):
    /metrics answers without a key and names every adapter, while the API still needs keys."""
    settings = world[0].model_copy(update={"metrics_open": True})
    with TestClient(create_app(settings)) as c:
        for name in ("alpha", "beta"):
            c.post("/v1/classify", json={"adapter": name, "inputs": ["x"]}, headers=bearer(INFER_ALL))
        resp = c.get("/metrics")
        assert resp.status_code == 200
        assert {"alpha", "beta"} <= _adapters_in(text_string_to_metric_families(resp.text))
        assert c.post("/v1/classify", json={"adapter": "alpha", "inputs": ["x"]}).status_code == 401
