"""API keys: parsing, hashing, the public-bind refusal, and the authorization matrix
(every endpoint x {no key, bad key, infer key allowed, infer key not allowed, admin}) on tiny models.
The `metrics` scope and what a key sees of other tenants: tests/service/test_tenant_isolation.py."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from factories import openai_error as _error
from factories import publish_cls_adapter, tiny_bert_base
from fastapi.testclient import TestClient

from adapters.registry import Registry
from service.app import create_app
from service.auth import AuthConfigError, KeyStore, check_bind_address, is_loopback, parse_keys
from service.config import Settings

INFER = "infer-key-0001"  # infer, adapters sentiment*
ADMIN = "admin-key-0001"  # admin, all adapters
BASE_ONLY = "base-only-key-01"  # infer, only the base model (matched by glob on its id)
SCOPED_ADMIN = "scoped-admin-0001"  # infer + admin, only sentiment*; given as key_sha256 in a file
LORASWAP = str(Path(sys.executable).with_name("loraswap"))


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    base_dir = tiny_bert_base(root / "base")
    registry = Registry(root / "registry")
    publish_cls_adapter(registry, base_dir, root / "work", "sentiment", num_labels=2, seed=1)
    publish_cls_adapter(registry, base_dir, root / "work", "intent", num_labels=3, seed=2)
    keys_file = root / "keys.json"
    keys_file.write_text(json.dumps([{"key_sha256": hashlib.sha256(SCOPED_ADMIN.encode()).hexdigest(),
                                      "scopes": ["infer", "admin"], "adapters": ["sentiment*"], "name": "ops"}]))
    keys = [{"key": INFER, "scopes": ["infer"], "adapters": ["sentiment*"]},
            {"key": ADMIN, "scopes": ["admin"]},
            {"key": BASE_ONLY, "scopes": ["infer"], "adapters": ["*/base"]}]
    settings = Settings(registry=str(root / "registry"), encoder_base=str(base_dir), decoder_base="",
                        watch_interval_s=0, max_gpu_adapters=4, api_keys=json.dumps(keys), api_keys_file=keys_file)
    return settings, root


@pytest.fixture(scope="module")
def client(world):
    with TestClient(create_app(world[0])) as c:
        yield c


# ---- configuration --------------------------------------------------------------------------------------


def test_only_hashes_are_kept(world):
    store = KeyStore.from_settings(world[0])
    assert store.enabled and len(store.keys) == 4
    for key in store.keys:
        assert len(key.sha256) == 64 and INFER not in repr(key) and ADMIN not in repr(key)
    assert store.lookup(INFER).scopes == {"infer"}
    assert store.lookup(SCOPED_ADMIN).id == "ops"
    assert store.lookup("infer-key-0002") is None and store.lookup("") is None


@pytest.mark.parametrize("text, message", [
    ("{", "invalid JSON"),
    ('{"key": "x"}', "JSON list"),
    ('[{"scopes": ["infer"]}]', "exactly one of"),
    ('[{"key": "abcdefgh1", "key_sha256": "' + "0" * 64 + '", "scopes": ["infer"]}]', "exactly one of"),
    ('[{"key": "short", "scopes": ["infer"]}]', "at least 8"),
    ('[{"key_sha256": "abc", "scopes": ["infer"]}]', "64 hex"),
    ('[{"key": "abcdefgh1", "scopes": []}]', "non-empty"),
    ('[{"key": "abcdefgh1", "scopes": ["root"]}]', "unknown scope"),
    ('[{"key": "abcdefgh1", "scope": ["infer"]}]', "unknown field"),
    ('[{"key": "abcdefgh1", "scopes": ["infer"], "adapters": "*"}]', "glob"),
    ('[{"key": "abcdefgh1", "scopes": ["infer"]}, {"key": "abcdefgh1", "scopes": ["admin"]}]', "duplicate"),
])
def test_bad_key_config_is_refused(text, message):
    with pytest.raises(AuthConfigError, match=message):
        parse_keys(text, "keys")


def test_sha256_prefix_and_case_accepted():
    digest = hashlib.sha256(b"abcdefgh1").hexdigest().upper()
    (key,) = parse_keys(json.dumps([{"key_sha256": "sha256:" + digest, "scopes": ["infer"]}]), "keys")
    assert KeyStore([key], True).lookup("abcdefgh1") == key


def test_when_auth_is_on(tmp_path):
    assert not KeyStore.from_settings(Settings()).enabled
    assert KeyStore.from_settings(Settings(auth_enabled=True)).enabled  # on with no keys: everything refused
    keys = json.dumps([{"key": "abcdefgh1", "scopes": ["infer"]}])
    assert KeyStore.from_settings(Settings(api_keys=keys, auth_enabled=False)).enabled  # keys always win
    with pytest.raises(AuthConfigError, match="cannot read"):
        KeyStore.from_settings(Settings(api_keys_file=tmp_path / "missing.json"))


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                             ("localhost", True), ("0.0.0.0", False), ("::", False),
                                             ("10.1.2.3", False), ("example.com", False)])
def test_public_bind_needs_auth_or_explicit_opt_out(host, loopback):
    assert is_loopback(host) == loopback
    off = KeyStore([], False)
    if loopback:
        check_bind_address(Settings(host=host), off)
    else:
        with pytest.raises(AuthConfigError, match="refusing to serve"):
            check_bind_address(Settings(host=host), off)
        check_bind_address(Settings(host=host, auth_enabled=False), off)  # explicit opt-out
        check_bind_address(Settings(host=host), KeyStore([], True))


def test_serve_on_public_address_without_keys_exits_1_with_one_line(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith("LORASWAP_")} | {"LORASWAP_ENCODER_BASE": "", "LORASWAP_DECODER_BASE": ""}
    done = subprocess.run([LORASWAP, "serve", "--host", "0.0.0.0", "--port", "1", "--registry", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to serve 0.0.0.0"), done.stderr


def test_serve_with_a_bad_key_file_exits_1_with_one_line(tmp_path, monkeypatch, capsys):
    from adapters.cli import main

    for name in ("LORASWAP_API_KEYS", "LORASWAP_AUTH_ENABLED", "LORASWAP_HOST"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "keys.json").write_text("[{")
    monkeypatch.setenv("LORASWAP_API_KEYS_FILE", str(tmp_path / "keys.json"))
    assert main(["serve", "--registry", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and "invalid JSON" in err, err
    monkeypatch.setenv("LORASWAP_API_KEYS_FILE", str(tmp_path / "missing.json"))
    assert main(["serve", "--host", "0.0.0.0", "--registry", str(tmp_path)]) == 1
    assert "cannot read API keys file" in capsys.readouterr().err


# ---- the matrix -----------------------------------------------------------------------------------------

WHO = ["none", "bad", "infer_allowed", "infer_denied", "admin"]
KEY = {"none": None, "bad": "not-a-real-key-123", "infer_allowed": INFER, "infer_denied": INFER, "admin": ADMIN}
# The adapter each column names: the infer key is allowed sentiment*, not intent; admin may manage any.
TARGET = {"none": "sentiment", "bad": "sentiment", "infer_allowed": "sentiment", "infer_denied": "intent",
          "admin": "intent"}

INFER_ONLY = {"none": 401, "bad": 401, "infer_allowed": 200, "infer_denied": 403, "admin": 403}
ADMIN_ONLY = {"none": 401, "bad": 401, "infer_allowed": 403, "infer_denied": 403, "admin": 200}
ANY_KEY = {"none": 401, "bad": 401, "infer_allowed": 200, "infer_denied": 403, "admin": 200}
LISTING = {"none": 401, "bad": 401, "infer_allowed": 200, "infer_denied": 200, "admin": 200}
METRICS = ADMIN_ONLY  # a `metrics` or `admin` key (metrics keys: tests/service/test_tenant_isolation.py)
OPEN = dict.fromkeys(WHO, 200)


def _classify(c, name, h):
    return c.post("/v1/classify", json={"adapter": name, "inputs": ["great movie"]}, headers=h)


def _load(c, name, h):
    return c.post("/v1/adapters", json={"adapter": name}, headers=h)


def _delete(c, name, h):
    c.post("/v1/adapters", json={"adapter": name}, headers=bearer(ADMIN))  # make sure it is loaded
    return c.delete(f"/v1/adapters/{name}", headers=h)


def _alias(c, name, h):
    return c.post(f"/v1/adapters/{name}/aliases", json={"alias": "stable", "version": 1}, headers=h)


def _vllm_load(c, name, h):
    return c.post("/v1/load_lora_adapter", json={"lora_name": name}, headers=h)


def _vllm_unload(c, name, h):
    c.post("/v1/adapters", json={"adapter": name}, headers=bearer(ADMIN))
    return c.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=h)


def _completions(c, name, h):
    return c.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2}, headers=h)


def _chat(c, name, h):
    return c.post("/v1/chat/completions", json={"model": name, "max_tokens": 2,
                                                "messages": [{"role": "user", "content": "hi"}]}, headers=h)


ENDPOINTS = {
    "POST /v1/classify": (_classify, INFER_ONLY),
    "GET /v1/models": (lambda c, n, h: c.get("/v1/models", headers=h), LISTING),
    "GET /v1/adapters": (lambda c, n, h: c.get("/v1/adapters", headers=h), LISTING),
    "GET /v1/adapters/{name}": (lambda c, n, h: c.get(f"/v1/adapters/{n}", headers=h), ANY_KEY),
    "POST /v1/adapters": (_load, ADMIN_ONLY),
    "DELETE /v1/adapters/{name}": (_delete, ADMIN_ONLY),
    "POST /v1/adapters/{name}/aliases": (_alias, ADMIN_ONLY),
    "POST /v1/load_lora_adapter": (_vllm_load, ADMIN_ONLY),
    "POST /v1/unload_lora_adapter": (_vllm_unload, ADMIN_ONLY),
    "GET /health": (lambda c, n, h: c.get("/health", headers=h), OPEN),
    "GET /ready": (lambda c, n, h: c.get("/ready", headers=h), OPEN),
    "GET /metrics": (lambda c, n, h: c.get("/metrics", headers=h), METRICS),
}
# Generation endpoints (service/api/openai.py): without a decoder base the auth answers are still checked;
# a 2xx is not expected here (no generation engine), only that the key is refused or let through.
GENERATION = {"POST /v1/completions": _completions, "POST /v1/chat/completions": _chat}


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_authz_matrix(client, endpoint, who):
    call, expected = ENDPOINTS[endpoint]
    resp = call(client, TARGET[who], bearer(KEY[who]))
    want = expected[who]
    if want == 200:
        assert resp.status_code == 200, (endpoint, who, resp.text)
    else:
        _error(resp, want)
    if endpoint in ("GET /v1/models", "GET /v1/adapters") and want == 200:
        ids = {row.get("id") or row.get("name") for row in resp.json()["data"]}
        if who.startswith("infer"):  # sentiment* only: intent is not even listed
            assert "sentiment" in ids and "intent" not in ids, ids
        else:
            assert {"sentiment", "intent"} <= ids, ids


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("endpoint", list(GENERATION))
def test_authz_matrix_generation(client, endpoint, who):
    resp = GENERATION[endpoint](client, TARGET[who], bearer(KEY[who]))
    want = {"none": 401, "bad": 401, "infer_denied": 403, "admin": 403}.get(who)
    if want is not None:
        _error(resp, want)
    else:  # allowed: auth lets it through (no decoder base here, so the engine's own answer follows)
        assert resp.status_code not in (401, 403), resp.text


def test_error_codes_and_challenge(client):
    assert _error(_classify(client, "sentiment", {}), 401)["code"] == "missing_api_key"
    resp = _classify(client, "sentiment", {"Authorization": "Basic dXNlcjpwYXNz"})
    assert _error(resp, 401)["type"] == "authentication_error"
    resp = _classify(client, "sentiment", bearer("wrong-key-000"))
    assert _error(resp, 401)["code"] == "invalid_api_key" and 'error="invalid_token"' in resp.headers["www-authenticate"]
    resp = _classify(client, "intent", bearer(INFER))
    err = _error(resp, 403)
    assert err["code"] == "adapter_not_allowed" and err["param"] == "adapter" and err["type"] == "permission_error"
    assert 'error="insufficient_scope"' in resp.headers["www-authenticate"]
    assert _error(_classify(client, "sentiment", bearer(ADMIN)), 403)["code"] == "insufficient_scope"


def test_pinned_refs_and_unknown_adapters(client):
    assert _classify(client, "sentiment@1", bearer(INFER)).status_code == 200
    _error(_classify(client, "intent@1", bearer(INFER)), 403)
    _error(_classify(client, "sentiment-missing", bearer(INFER)), 404)  # allowed by the glob, does not exist
    _error(_classify(client, "nope", bearer(INFER)), 403)  # not allowed: its existence is not revealed


def test_base_model_is_matched_by_its_id(client, world):
    base = world[0].encoder_base
    assert _classify(client, base, bearer(BASE_ONLY)).status_code == 200
    _error(_classify(client, base, bearer(INFER)), 403)
    _error(_classify(client, "sentiment", bearer(BASE_ONLY)), 403)
    ids = {m["id"] for m in client.get("/v1/models", headers=bearer(BASE_ONLY)).json()["data"]}
    assert ids == {base}
    ids = {m["id"] for m in client.get("/v1/models", headers=bearer(INFER)).json()["data"]}
    assert base not in ids and "sentiment" in ids


def test_admin_limited_to_its_adapters(client, world):
    h = bearer(SCOPED_ADMIN)
    assert _load(client, "sentiment", h).status_code == 200
    assert _classify(client, "sentiment", h).status_code == 200
    _error(_load(client, "intent", h), 403)
    _error(client.delete("/v1/adapters/intent", headers=h), 403)
    _error(_alias(client, "intent", h), 403)
    _error(_vllm_load(client, "intent", h), 403)
    path = str(world[1] / "registry" / "intent" / "1")  # a path whose manifest names a forbidden adapter
    _error(client.post("/v1/adapters", json={"path": path}, headers=h), 403)
    _error(client.post("/v1/load_lora_adapter", json={"lora_name": "sentiment", "lora_path": path}, headers=h), 403)
    assert client.post("/v1/adapters", json={"path": path}, headers=bearer(ADMIN)).status_code == 200


def test_auth_on_without_keys_refuses_everything_but_probes(world):
    settings = world[0].model_copy(update={"api_keys": None, "api_keys_file": None, "auth_enabled": True})
    with TestClient(create_app(settings)) as c:
        _error(c.get("/v1/models"), 401)
        _error(_classify(c, "sentiment", bearer(INFER)), 401)
        _error(c.get("/metrics"), 401)
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
