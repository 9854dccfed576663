"""Rollout over HTTP, in process on a tiny BERT: canary splits (share, stickiness, weights 0 and 1, removal),
shadow comparisons (exact on a scripted case, primary answers unchanged, nothing lost under traffic), and the
promotion gate over a real summary. Every answer is checked against PEFT's output of the version it reports."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch
from factories import (
    openai_error,
    peft_logits,
    publish_cls_adapter,
    publish_embedding_adapter,
    tiny_bert_base,
)
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from adapters import promotion
from adapters.errors import PromotionRefused
from adapters.pooling import Pooling
from adapters.registry import Registry
from service.app import create_app
from service.config import Settings

TEXTS = ["great movie", "dull boring w1 w2 w3", "w5", "loved w7 w9", "w3 w4", "boring w8"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    base_dir = tiny_bert_base(root / "base")
    registry = Registry(root / "registry")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    logits = {}  # version -> PEFT logits per text
    for version in (1, 2, 3):
        model = publish_cls_adapter(registry, base_dir, root / "work", "intent", num_labels=5, seed=version,
                                    version=version)
        logits[version] = torch.stack(peft_logits(model, tokenizer, TEXTS))
    vectors = {}
    for version in (1, 2):
        model = publish_embedding_adapter(registry, base_dir, root / "work", "search", seed=10 + version,
                                          version=version)
        with torch.no_grad():
            vectors[version] = torch.stack([
                Pooling()(model(**(enc := tokenizer([t], return_tensors="pt"))).last_hidden_state,
                          enc["attention_mask"])[0] for t in TEXTS])
    publish_embedding_adapter(registry, base_dir, root / "work", "intent", seed=30, version=4)  # another task
    registry.set_alias("intent", "stable", 1)
    registry.set_alias("search", "stable", 1)
    settings = Settings(registry=str(root / "registry"), encoder_base=str(base_dir), decoder_base="",
                        watch_interval_s=0, max_gpu_adapters=6, max_inputs=8, max_input_chars=200)
    with TestClient(create_app(settings)) as client:
        yield client, logits, vectors


@pytest.fixture
def client(world):
    client = world[0]
    yield client
    for name in ("intent", "search"):  # every test starts with no canary and no shadow
        for alias in client.get(f"/v1/adapters/{name}").json()["aliases"]:
            if alias != "stable":
                assert client.delete(f"/v1/adapters/{name}/aliases/{alias}").status_code == 200


def _alias(client, name: str, alias: str, version: int, weight: float | None = None) -> dict:
    body = {"alias": alias, "version": version} | ({} if weight is None else {"weight": weight})
    resp = client.post(f"/v1/adapters/{name}/aliases", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _classify(client, logits, i: int, *, user: str | None = None, headers=None, adapter="intent") -> int:
    """One request for TEXTS[i % n]; checks the answer against the oracle of the version it reports."""
    text = TEXTS[i % len(TEXTS)]
    resp = client.post("/v1/classify", json={"adapter": adapter, "inputs": [text]} | ({"user": user} if user else {}),
                       headers=headers or {})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    version = body["version"]
    assert resp.headers["x-loraswap-adapter-version"] == str(version)
    want = torch.softmax(logits[version][i % len(TEXTS)], -1)
    torch.testing.assert_close(torch.tensor(list(body["results"][0]["scores"].values())), want, atol=1e-4, rtol=0)
    return version


def test_canary_takes_its_share_and_each_answer_is_its_versions(world, client):
    _, logits, _ = world
    assert _alias(client, "intent", "canary", 2, 0.25)["weights"] == {"canary": 0.25}
    versions = Counter(_classify(client, logits, i, user=f"caller-{i}") for i in range(2000))
    assert set(versions) == {1, 2}
    assert abs(versions[2] / 2000 - 0.25) <= 0.03, versions
    # without a route key each request is drawn on its own: both versions still serve
    assert set(Counter(_classify(client, logits, i) for i in range(60))) == {1, 2}


def test_one_caller_sees_one_version_and_raising_the_weight_only_adds_callers(world, client):
    _, logits, _ = world
    _alias(client, "intent", "canary", 2, 0.3)
    seen = {}
    for caller in range(60):
        versions = {_classify(client, logits, i, user=f"u{caller}") for i in range(4)}
        assert len(versions) == 1, (caller, versions)
        seen[caller] = versions.pop()
    assert set(seen.values()) == {1, 2}
    # the header wins over `user`: same header, different users, one version
    by_header = {_classify(client, logits, 0, user=f"u{c}", headers={"X-Loraswap-Route-Key": "team-a"})
                 for c in range(20)}
    assert len(by_header) == 1
    _alias(client, "intent", "canary", 2, 0.6)
    after = {caller: _classify(client, logits, 0, user=f"u{caller}") for caller in range(60)}
    assert all(after[c] == 2 for c in seen if seen[c] == 2)
    assert sum(v == 2 for v in after.values()) > sum(v == 2 for v in seen.values())


def test_weights_zero_and_one_and_removal(world, client):
    _, logits, _ = world
    _alias(client, "intent", "canary", 3, 0.0)
    assert {_classify(client, logits, i, user=f"a{i}") for i in range(100)} == {1}
    _alias(client, "intent", "canary", 3, 1.0)
    assert {_classify(client, logits, i, user=f"a{i}") for i in range(100)} == {3}
    # explicit refs are never split
    assert {_classify(client, logits, i, adapter="intent@stable") for i in range(20)} == {1}
    assert {_classify(client, logits, i, adapter="intent@2") for i in range(5)} == {2}
    resp = client.delete("/v1/adapters/intent/aliases/canary")
    assert resp.status_code == 200 and resp.json()["aliases"] == {"stable": 1}
    assert {_classify(client, logits, i, user=f"a{i}") for i in range(100)} == {1}


@pytest.mark.parametrize("body, status", [
    ({"alias": "canary", "version": 2, "weight": 1.5}, 422),
    ({"alias": "canary", "version": 2, "weight": -0.1}, 422),
    ({"alias": "stable", "version": 2, "weight": 0.5}, 400),
    ({"alias": "canary", "version": 9, "weight": 0.5}, 404),
])
def test_bad_weights_are_refused_and_change_nothing(client, body, status):
    before = client.get("/v1/adapters/intent").json()
    openai_error(client.post("/v1/adapters/intent/aliases", json=body), status)
    assert client.get("/v1/adapters/intent").json()["aliases"] == before["aliases"]


def test_canary_weights_cannot_add_up_past_one(client):
    _alias(client, "intent", "canary", 2, 0.7)
    err = openai_error(client.post("/v1/adapters/intent/aliases", json={"alias": "exp", "version": 3, "weight": 0.4}),
                       400)
    assert "1.1 > 1" in err["message"]
    _alias(client, "intent", "shadow", 3, 0.5)  # a shadow's weight is its copied share, not a split
    assert client.get("/v1/adapters/intent").json()["weights"] == {"canary": 0.7, "shadow": 0.5}
    assert openai_error(client.delete("/v1/adapters/intent/aliases/nope"), 404)


def _drain(client) -> None:
    client.portal.call(client.app.state.ctx.shadows.drain)


def _summary(client, name: str) -> dict:
    _drain(client)
    resp = client.get(f"/v1/adapters/{name}/shadow")
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_shadow_compares_exactly_and_leaves_the_primary_answer_alone(world, client):
    _, logits, _ = world
    before = _summary(client, "intent")["pairs"]
    plain = [client.post("/v1/classify", json={"adapter": "intent", "inputs": TEXTS}).json() for _ in range(5)]
    _alias(client, "intent", "shadow", 3)
    shadowed = [client.post("/v1/classify", json={"adapter": "intent", "inputs": TEXTS}).json() for _ in range(5)]
    assert shadowed == plain  # bit-identical: the shadow's rows never touch the primary's answer
    summary = _summary(client, "intent")
    assert summary["shadow"] == 3
    pair = next(p for p in summary["pairs"] if (p["primary"], p["shadow"]) == (1, 3))
    old = next((p for p in before if (p["primary"], p["shadow"]) == (1, 3)), {"requests": 0, "rows": 0})
    assert pair["requests"] - old["requests"] == 5 and pair["dropped"] == 0
    assert pair["rows"] - old["rows"] == 5 * len(TEXTS)
    p, q = torch.softmax(logits[1], -1), torch.softmax(logits[3], -1)
    if not old["rows"]:  # a fresh pair: its means are this scripted case's
        agree = int((p.argmax(-1) == q.argmax(-1)).sum())
        assert 0 < agree < len(TEXTS), "the scripted case needs agreeing and disagreeing rows"
        assert round(pair["agreement"] * pair["rows"]) == 5 * agree  # exact count (the mean is rounded)
        assert pair["mean_tv"] == pytest.approx(float((p - q).abs().sum(-1).mean() / 2), abs=1e-4)
        assert pair["mean_kl"] == pytest.approx(float((p * (p.log() - q.log())).sum(-1).mean()), abs=1e-4)
        assert pair["mean_cosine"] is None
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    rows = {s.labels["outcome"]: s.value for s in families["loraswap_shadow_rows"].samples
            if s.name.endswith("_total") and s.labels["adapter"] == "intent" and s.labels["shadow"] == "3"}
    assert rows["agree"] + rows["disagree"] == pair["rows"]
    assert rows["agree"] == round(pair["agreement"] * pair["rows"])


def test_embedding_shadow_reports_the_cosine(world, client):
    _, _, vectors = world
    _alias(client, "search", "shadow", 2)
    for _ in range(3):
        resp = client.post("/v1/embeddings", json={"model": "search", "input": TEXTS})
        assert resp.status_code == 200 and resp.headers["x-loraswap-adapter-version"] == "1"
    pair = next(p for p in _summary(client, "search")["pairs"] if (p["primary"], p["shadow"]) == (1, 2))
    want = torch.nn.functional.cosine_similarity(vectors[1], vectors[2], dim=-1).mean()
    assert pair["rows"] == 3 * len(TEXTS) and pair["agreement"] is None
    assert pair["mean_cosine"] == pytest.approx(float(want), abs=1e-4)


def test_shadow_set_and_removed_under_traffic_loses_nothing(world, client):
    _, logits, _ = world
    failures: list[str] = []
    stop = threading.Event()

    def traffic(worker: int) -> None:
        i = 0
        while not stop.is_set() or i < 30:
            try:
                assert _classify(client, logits, i, user=f"w{worker}") == 1
            except AssertionError as exc:  # noqa: PERF203 - collected, the main thread fails the test
                failures.append(str(exc))
            i += 1

    threads = [threading.Thread(target=traffic, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for version in (2, 3, 2):
        _alias(client, "intent", "shadow", version)
        client.delete("/v1/adapters/intent/aliases/shadow")
    _alias(client, "intent", "shadow", 3)
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    assert all(p["dropped"] == 0 for p in _summary(client, "intent")["pairs"])


def test_a_shadow_refused_for_good_is_not_tried_again(world, client):
    """intent@4 is an embedding adapter: the first copy is refused (409) and counted; later copies are
    dropped at once, without another manifest read, and the answers are unaffected."""
    _, logits, _ = world
    _alias(client, "intent", "shadow", 4)
    router = client.app.state.ctx.routers["classification"]
    reads = []
    original = router.registry.manifest
    router.registry.manifest = lambda *key: reads.append(key) or original(*key)
    try:
        for i in range(4):
            assert _classify(client, logits, i) == 1
            _drain(client)
    finally:
        router.registry.manifest = original
    pair = next(p for p in _summary(client, "intent")["pairs"] if (p["primary"], p["shadow"]) == (1, 4))
    assert pair["dropped"] == 4 and pair["requests"] == 0
    assert reads.count(("intent", 4)) == 1
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    results = {s.labels["result"]: s.value for s in families["loraswap_shadow_requests"].samples
               if s.name.endswith("_total") and s.labels["shadow"] == "4"}
    assert results == {"AdapterConflictError": 1.0, "refused": 3.0}


def test_promotion_gate_reads_the_summary(world, client):
    _alias(client, "intent", "shadow", 2)
    for _ in range(4):
        client.post("/v1/classify", json={"adapter": "intent", "inputs": TEXTS})
    summary = _summary(client, "intent")
    pair = next(p for p in summary["pairs"] if (p["primary"], p["shadow"]) == (1, 2))
    account = promotion.check(summary, 2, promotion.Gate(min_requests=4, require_agreement=pair["agreement"]))
    assert f"agreement {pair['agreement']:.4f}" in account
    with pytest.raises(PromotionRefused, match=r"requests < 100000"):
        promotion.check(summary, 2, promotion.Gate(min_requests=100_000))
    with pytest.raises(PromotionRefused, match="agreement .* < 1.01"):
        promotion.check(summary, 2, promotion.Gate(require_agreement=1.01))
    with pytest.raises(PromotionRefused, match="no cosine measured"):
        promotion.check(summary, 2, promotion.Gate(require_cosine=0.9))
    with pytest.raises(PromotionRefused, match="no shadow traffic"):
        promotion.check(summary, 5, promotion.Gate())
