"""Injected faults against a live uvicorn server on tiny models; after each one the server keeps serving.

(a) adapter files deleted or corrupted on disk while the adapter is resident (served from memory; a reload
    of a corrupted version is refused with 4xx and serving is unchanged) and while it is loading;
(b) the registry unreachable (its filesystem raises OSError) during reloads and registry watch steps:
    resident adapters keep serving, /ready stays 200 (bases loaded, not draining), the watch survives and
    follows the registry again once it is back;
(c) an out-of-memory error in one batch/step: only that batch's requests fail, with 503 engine_error and
    Retry-After, the next ones succeed (classification and generation, before and after the first token).
"""

from __future__ import annotations

import errno
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from e2e.tiny_world import build_world, served, wait_for
from factories import publish_cls_adapter

import adapters.format
import service.router
from adapters.registry import Registry
from service.app import create_app

TEXTS = ["great movie", "dull boring w1", "w5 w6 w7"]
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (injected)"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("faults"))


def fresh(world, tmp_path, **updates):
    """A private copy of the world's registry (the tests break files in it) and settings that use it."""
    root = tmp_path / "registry"
    shutil.copytree(world["registry_dir"], root)
    return Registry(root), world["settings"].model_copy(update={"registry": str(root), **updates})


def classify(url, adapter, texts=TEXTS):
    return httpx.post(f"{url}/v1/classify", json={"adapter": adapter, "inputs": texts}, timeout=60)


def scores(resp) -> list[dict]:
    assert resp.status_code == 200, resp.text
    return [r["scores"] for r in resp.json()["results"]]


def error(resp, status, code=None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    if code is not None:
        assert err["code"] == code, err
    return err


def resident(url, name) -> dict | None:
    """The adapter's residency row; None when it is not resident (404: not in the registry either)."""
    resp = httpx.get(f"{url}/v1/adapters/{name}", timeout=30)
    assert resp.status_code in (200, 404), resp.text
    return resp.json()["resident"] if resp.status_code == 200 else None


def corrupt(folder) -> None:
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # same size, different bytes: only the manifest's sha256 tells
    weights.write_bytes(bytes(data))


# ---- (a) adapter files on disk --------------------------------------------------------------------------


def test_files_deleted_or_corrupted_while_resident(world, tmp_path):
    registry, settings = fresh(world, tmp_path)
    with served(create_app(settings)) as url:
        before = {name: scores(classify(url, name)) for name in ("sentiment", "intent")}
        intent_v1 = registry.fetch("intent", 1)
        saved = tmp_path / "intent-1"
        shutil.copytree(intent_v1, saved)
        shutil.rmtree(registry.fetch("sentiment", 1))  # gone from disk while resident
        corrupt(intent_v1)  # corrupted in place while resident
        for _ in range(3):  # served from memory, unchanged
            assert scores(classify(url, "sentiment")) == before["sentiment"]
            assert scores(classify(url, "intent")) == before["intent"]

        # A reload of a corrupted version, from a path or as a new registry version, is refused (4xx) ...
        broken = tmp_path / "broken"
        shutil.copytree(saved, broken)
        corrupt(broken)
        err = error(httpx.post(f"{url}/v1/adapters", json={"path": str(broken)}, timeout=60), 422)
        assert "sha256" in err["message"] or "hash" in err["message"], err
        publish_cls_adapter(registry, world["encoder"], tmp_path / "work", "intent", num_labels=3, seed=99,
                            version=2)
        corrupt(registry.fetch("intent", 2))
        error(httpx.post(f"{url}/v1/adapters", json={"adapter": "intent@2"}, timeout=60), 422)
        error(classify(url, "intent@2"), 422)
        # ... and changes nothing that is serving.
        row = resident(url, "intent")
        assert row["version"] == 1 and row["resident_versions"] == [1], row
        got = classify(url, "intent")
        assert got.json()["version"] == 1 and scores(got) == before["intent"]
        assert scores(classify(url, "sentiment")) == before["sentiment"]
        assert httpx.get(f"{url}/ready").status_code == 200


def test_files_deleted_or_corrupted_while_loading(world, tmp_path, monkeypatch):
    """Sabotage between the registry look-up and the read (`before`), or in the middle of the read, after
    the folder was listed and while its hashes are checked (`during`)."""
    registry, settings = fresh(world, tmp_path)
    real_read, real_hash = service.router.read_adapter, adapters.format.sha256_file
    before, during = {}, {}  # adapter name -> what to do to its version folder

    def read_adapter(path, *args, **kwargs):
        if (action := before.pop(path.parent.name, None)) is not None:
            action(path)
        return real_read(path, *args, **kwargs)

    def sha256_file(path):
        if (action := during.pop(path.parent.parent.name, None)) is not None:
            action(path.parent)
        return real_hash(path)

    monkeypatch.setattr(service.router, "read_adapter", read_adapter)
    monkeypatch.setattr(adapters.format, "sha256_file", sha256_file)
    with served(create_app(settings)) as url:
        saved = {name: tmp_path / "saved" / name for name in ("topic", "spam", "intent")}
        for name, copy in saved.items():
            shutil.copytree(registry.fetch(name, 1), copy)
        before["topic"] = corrupt
        assert "sha256" in error(classify(url, "topic"), 422)["message"]  # the request gets the reason
        before["spam"] = shutil.rmtree
        assert "does not exist" in error(classify(url, "spam"), 422)["message"]
        during["intent"] = shutil.rmtree
        error(classify(url, "intent"), 503)  # an I/O failure mid-read: retryable, not a 500
        assert not before and not during  # every sabotage really ran
        for name in saved:
            assert resident(url, name) is None
        assert scores(classify(url, "sentiment"))  # others unaffected

        for name, copy in saved.items():  # repaired on disk: they load now (failures are not cached)
            folder = registry.root + f"/{name}/1"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(copy, folder)
            assert scores(classify(url, name)) and resident(url, name)["version"] == 1
        assert httpx.get(f"{url}/ready").status_code == 200


# ---- (b) registry unreachable ---------------------------------------------------------------------------


class FlakyFS:
    """An fsspec filesystem proxy whose every method raises OSError while `down` is set."""

    def __init__(self, fs):
        self._fs, self.down, self.calls_refused = fs, threading.Event(), 0

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if not callable(attr) or not self.down.is_set():
            return attr

        def refuse(*args, **kwargs):
            self.calls_refused += 1
            raise OSError(errno.ENETUNREACH, "registry unreachable (injected)")

        return refuse


def test_registry_unreachable_during_reload_and_watch(world, tmp_path):
    registry, settings = fresh(world, tmp_path, watch_interval_s=0.2)
    registry.fs = flaky = FlakyFS(registry.fs)
    publisher = Registry(registry.root)  # another writer that can still reach the registry
    with served(create_app(settings, registry=registry)) as url:
        first = classify(url, "sentiment")
        assert first.json()["version"] == 1
        flaky.down.set()
        publish_cls_adapter(publisher, world["encoder"], tmp_path / "work", "sentiment", num_labels=2, seed=7,
                            version=2)
        wait_for(lambda: flaky.calls_refused >= 3, 20, "watch steps against the broken registry")

        for _ in range(3):  # the resident version keeps serving, by name and pinned
            got = classify(url, "sentiment")
            assert got.json()["version"] == 1 and scores(got) == scores(first)
        assert scores(classify(url, "sentiment@1")) == scores(first)
        error(httpx.post(f"{url}/v1/adapters", json={"adapter": "sentiment"}, timeout=30), 503)  # reload
        error(classify(url, "topic"), 503)  # not resident: cannot be fetched now, retryable
        error(httpx.get(f"{url}/v1/adapters", timeout=30), 503)
        error(httpx.get(f"{url}/v1/adapters/sentiment", timeout=30), 503)
        assert httpx.get(f"{url}/ready").status_code == 200  # bases loaded, not draining: still routable
        assert httpx.get(f"{url}/health").status_code == 200

        flaky.down.clear()  # back: the watch (still alive) switches to version 2
        wait_for(lambda: classify(url, "sentiment").json()["version"] == 2, 30, "watch after the outage")
        assert classify(url, "topic").status_code == 200


# ---- (c) out of memory in one batch ---------------------------------------------------------------------


def test_oom_in_one_classification_batch_fails_only_that_batch(world):
    app = create_app(world["settings"])
    with served(app) as url:
        # Both adapters resident first: a slot copy runs on the compute thread, which the held batch occupies.
        assert [classify(url, name).status_code for name in ("sentiment", "intent")] == [200, 200]
        engine = app.state.ctx.engines["classification"]
        batcher = engine.batcher
        real_run, calls, failed_rows = engine.run, [], []

        def run(rows, slots):
            calls.append(len(rows))
            if len(calls) == 1:  # hold the first batch until six more requests wait behind it
                wait_for(lambda: batcher.queue_depth >= 6 and not batcher._tokenizing, 30, "six queued requests")
            elif len(calls) == 2:  # the second batch (those six) runs out of memory
                failed_rows.append(len(rows))
                raise RuntimeError(OOM)
            return real_run(rows, slots)

        engine.run = run
        try:
            with ThreadPoolExecutor(8) as pool:
                head = pool.submit(classify, url, "sentiment", ["w1"])
                wait_for(lambda: len(calls) == 1, 30, "first batch running")
                queued = [pool.submit(classify, url, "intent", [f"w{i}"]) for i in range(6)]
                head, queued = head.result(60), [f.result(60) for f in queued]
        finally:
            engine.run = real_run
        assert head.status_code == 200, head.text
        assert failed_rows == [6]
        for resp in queued:
            err = error(resp, 503, "engine_error")
            assert resp.headers["retry-after"] == "1" and "out of memory" not in err["message"], err
        after = [classify(url, name) for name in ("sentiment", "intent", "topic")]
        assert [r.status_code for r in after] == [200, 200, 200]


def test_oom_in_one_generation_step_fails_only_its_requests(world):
    app = create_app(world["settings"])
    with served(app) as url:
        engine = app.state.ctx.engines["generation"]
        real_run, steps = engine.runner.run, []
        fail_at = set()

        def run(seqs, is_prefill):
            steps.append(len(seqs))
            if len(steps) in fail_at:
                raise RuntimeError(OOM)
            return real_run(seqs, is_prefill)

        engine.runner.run = run
        body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        chat = f"{url}/v1/chat/completions"
        try:
            fail_at.add(len(steps) + 1)  # the prefill of the next request
            err = error(httpx.post(chat, json=body, timeout=60), 503, "engine_error")
            assert "out of memory" not in err["message"]
            assert httpx.post(chat, json=body, timeout=60).status_code == 200  # the next one succeeds

            fail_at.add(len(steps) + 3)  # a decode step of a stream: an error event, then [DONE]
            with httpx.stream("POST", chat, json={**body, "stream": True}, timeout=60) as resp:
                assert resp.status_code == 200
                events = [line for line in resp.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and '"error"' in events[-2], events[-3:]
            assert httpx.post(chat, json=body, timeout=60).status_code == 200
        finally:
            engine.runner.run = real_run
        assert engine._thread is not None and engine._thread.is_alive()  # the engine thread survived

