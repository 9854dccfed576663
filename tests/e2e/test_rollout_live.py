"""A canary and a shadow on a real `loraswap serve`, moved with the real CLI: the server follows the registry
watch, the shadow's metrics have samples in /metrics, and `adapter promote` with a gate reads the live
summary, refuses with the numbers (changing nothing), then promotes once the gate is met."""

from __future__ import annotations

import time
from collections import Counter

import httpx
from e2e.tiny_world import build_world, env_for
from factories import publish_cls_adapter
from live import live_server
from prometheus_client.parser import text_string_to_metric_families

from adapters.cli import main
from service.metrics import METRIC_NAMES

SHADOW_FAMILIES = [n for n in METRIC_NAMES if n.startswith("loraswap_shadow_")]


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


def _versions(url: str, n: int, prefix: str) -> Counter:
    seen = Counter()
    for i in range(n):
        resp = httpx.post(f"{url}/v1/classify", json={"adapter": "sentiment", "inputs": ["great movie", "w1 w2"],
                                                      "user": f"{prefix}{i}"}, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-loraswap-adapter-version"] == str(resp.json()["version"])
        seen[resp.json()["version"]] += 1
    return seen


def _until(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
    return result


def test_canary_shadow_and_gated_promotion(tmp_path, capsys):
    world = build_world(tmp_path, generation=False, cls_adapters={"sentiment": 2})
    registry = str(world["registry_dir"])
    publish_cls_adapter(world["registry"], world["encoder"], tmp_path / "work", "sentiment", num_labels=2, seed=7)
    assert _cli(capsys, "adapter", "promote", "sentiment@1", "--registry", registry)[0] == 0
    env = env_for(world, LORASWAP_WATCH_INTERVAL_S="0.2")
    with live_server(world["registry_dir"], env=env) as url:
        assert _versions(url, 5, "warm") == {1: 5}
        code, out = _cli(capsys, "adapter", "promote", "sentiment@2", "--alias", "canary", "--weight", "0.5",
                         "--registry", registry)
        assert code == 0 and "weight 0.5" in out
        _until(lambda: len(_versions(url, 40, "c")) == 2)  # the watch picked the canary up
        assert _cli(capsys, "adapter", "unalias", "sentiment", "--alias", "canary", "--registry", registry)[0] == 0
        _until(lambda: _versions(url, 40, "c") == {1: 40})

        assert _cli(capsys, "adapter", "promote", "sentiment@2", "--alias", "shadow", "--registry", registry)[0] == 0
        _until(lambda: httpx.get(f"{url}/v1/adapters/sentiment/shadow", timeout=10).json()["shadow"] == 2)
        gate = ("--server", url, "--require-agreement", "0", "--registry", registry)
        summary = {}

        def shadowed(n: int):
            nonlocal summary
            _versions(url, 5, "s")
            summary = httpx.get(f"{url}/v1/adapters/sentiment/shadow", timeout=10).json()
            return sum(p["requests"] for p in summary["pairs"] if p["shadow"] == 2) >= n

        _until(lambda: shadowed(20))
        code, out = _cli(capsys, "adapter", "promote", "sentiment@2", "--min-requests", "100000", *gate)
        assert code == 1 and "refusing to promote sentiment@2" in out and "< 100000" in out, out
        assert world["registry"].aliases("sentiment")["stable"] == 1  # refused: nothing moved
        code, out = _cli(capsys, "adapter", "promote", "sentiment@2", "--min-requests", "20", *gate)
        assert code == 0 and "agreement" in out and "sentiment@stable -> 2" in out, out
        text = httpx.get(f"{url}/metrics", timeout=30).text
        _until(lambda: _versions(url, 5, "after") == {2: 5})  # the watch moved the plain name
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in SHADOW_FAMILIES:
        family = families[name.removesuffix("_total")]
        assert family.samples, name
    compared = sum(s.value for s in families["loraswap_shadow_rows"].samples
                   if s.name.endswith("_total") and s.labels["shadow"] == "2")
    assert compared >= 2 * 20
