import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import fsspec
import pytest
import torch

from adapters import registry as registry_module
from adapters.errors import (
    AdapterConflictError,
    AdapterNotFoundError,
    AdapterValidationError,
    InvalidInputError,
    RegistryError,
)
from adapters.format import read_adapter
from adapters.ref import AdapterRef
from adapters.registry import Registry, Traffic, resolve_in, traffic_in


@pytest.fixture(params=["dir", "file-url", "memory"])
def registry(request, tmp_path):
    if request.param == "dir":
        yield Registry(tmp_path / "reg", cache_dir=tmp_path / "cache")
    elif request.param == "file-url":
        yield Registry(f"file://{tmp_path / 'reg'}", cache_dir=tmp_path / "cache")
    else:
        root = f"/reg-{uuid.uuid4().hex}"
        yield Registry(f"memory://{root}", cache_dir=tmp_path / "cache")
        memory = fsspec.filesystem("memory")
        if memory.exists(root):
            memory.rm(root, recursive=True)


def _visible(registry):
    """Everything a reader can see, for 'registry unchanged' checks."""
    return registry.snapshot()


def test_publish_list_resolve(registry, adapter_dir):
    assert registry.names() == [] and registry.snapshot() == {}
    m1 = registry.publish(adapter_dir)
    m2 = registry.publish(adapter_dir)
    assert (m1.version, m2.version) == (1, 2)
    assert registry.names() == ["sentiment"]
    assert registry.versions("sentiment") == [1, 2]
    assert registry.manifest("sentiment", 2).version == 2
    assert registry.resolve("sentiment") == ("sentiment", 2)
    assert registry.resolve("sentiment@1") == ("sentiment", 1)
    other = registry.publish(adapter_dir, name="other", version=5)
    assert (other.name, other.version) == ("other", 5)
    assert registry.manifest("other", 5).name == "other"
    assert registry.names() == ["other", "sentiment"]


def test_publish_existing_version_refused(registry, adapter_dir):
    registry.publish(adapter_dir)
    before = _visible(registry)
    with pytest.raises(AdapterConflictError, match="sentiment@1 already exists"):
        registry.publish(adapter_dir, version=1)
    assert _visible(registry) == before


def test_publish_invalid_adapter_refused(registry, adapter_dir):
    (adapter_dir / "adapter_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(AdapterValidationError, match="pickle"):
        registry.publish(adapter_dir)
    (adapter_dir / "adapter_model.bin").unlink()
    with pytest.raises(AdapterValidationError, match="invalid adapter name"):
        registry.publish(adapter_dir, name="../Evil")
    assert registry.snapshot() == {}


def test_aliases(registry, adapter_dir):
    registry.publish(adapter_dir)
    registry.publish(adapter_dir)
    registry.set_alias("sentiment", "stable", 1)
    registry.set_alias("sentiment", "canary", 2)
    registry.set_alias("sentiment", "exp-7", 2)
    assert registry.aliases("sentiment") == {"stable": 1, "canary": 2, "exp-7": 2}
    assert registry.resolve("sentiment") == ("sentiment", 1)  # stable wins over newest
    assert registry.resolve("sentiment@canary") == ("sentiment", 2)
    registry.remove_alias("sentiment", "stable")
    assert registry.resolve("sentiment") == ("sentiment", 2)
    with pytest.raises(AdapterNotFoundError, match="no alias 'stable'"):
        registry.resolve("sentiment@stable")


def test_weighted_aliases(registry, adapter_dir):
    """A weight makes an alias a canary (stored beside its version; plain aliases stay plain numbers, so
    files written before weights existed read the same); the shadow's weight is its copied share."""
    for _ in range(3):
        registry.publish(adapter_dir)
    registry.set_alias("sentiment", "stable", 1)
    registry.set_alias("sentiment", "canary", 2, 0.1)
    registry.set_alias("sentiment", "exp", 3, 0.2)
    registry.set_alias("sentiment", "shadow", 3)
    raw = json.loads(registry.fs.cat_file(f"{registry.root}/sentiment/aliases.json"))
    assert raw == {"canary": {"version": 2, "weight": 0.1}, "exp": {"version": 3, "weight": 0.2}, "shadow": 3,
                   "stable": 1}
    assert registry.aliases("sentiment") == {"canary": 2, "exp": 3, "shadow": 3, "stable": 1}
    entry = registry.snapshot()["sentiment"]
    assert entry == registry.listing("sentiment") and entry["weights"] == {"canary": 0.1, "exp": 0.2}
    assert traffic_in(entry["aliases"], entry["weights"]) == Traffic(((2, 0.1), (3, 0.2)), (3, 1.0))
    registry.set_alias("sentiment", "canary", 2)  # no weight: a plain alias again
    assert registry.listing("sentiment")["weights"] == {"exp": 0.2}
    before = _visible(registry)
    for alias, weight, match in (("canary", 0.9, "add up to 1.1 > 1"), ("stable", 0.5, "stable alias takes no"),
                                 ("canary", float("nan"), "between 0 and 1"), ("canary", 1.5, "between 0 and 1")):
        with pytest.raises(InvalidInputError, match=match):
            registry.set_alias("sentiment", alias, 2, weight)
    assert _visible(registry) == before


def test_alias_to_missing_version(registry, adapter_dir):
    registry.publish(adapter_dir)
    registry.set_alias("sentiment", "stable", 1)
    before = _visible(registry)
    with pytest.raises(AdapterNotFoundError, match="sentiment@9 does not exist"):
        registry.set_alias("sentiment", "stable", 9)
    with pytest.raises(AdapterValidationError, match="invalid alias"):
        registry.set_alias("sentiment", "Bad/Alias", 1)
    assert _visible(registry) == before


def test_not_found(registry, adapter_dir):
    with pytest.raises(AdapterNotFoundError, match="not found"):
        registry.resolve("nothing")
    registry.publish(adapter_dir)
    with pytest.raises(AdapterNotFoundError, match="sentiment@3 not found"):
        registry.resolve("sentiment@3")
    with pytest.raises(AdapterNotFoundError):
        registry.manifest("sentiment", 3)


def test_errors_name_the_adapter_not_the_registry_location(registry, adapter_dir):
    """The registry's URL (a bucket in production) is configuration, not something API clients are told."""
    registry.publish(adapter_dir)
    calls = [(lambda: registry.resolve("nothing"), "adapter 'nothing' not found in the registry"),
             (lambda: registry.manifest("sentiment", 3), "adapter sentiment@3 not found in the registry"),
             (lambda: registry.delete("nothing"), "adapter 'nothing' not found in the registry"),
             (lambda: registry.delete("sentiment", 3), "adapter sentiment@3 not found in the registry"),
             (lambda: registry.publish(adapter_dir, version=1), "adapter sentiment@1 already exists in the registry")]
    for call, message in calls:
        with pytest.raises((AdapterNotFoundError, AdapterConflictError)) as raised:
            call()
        assert str(raised.value) == message
        assert registry.url not in str(raised.value) and registry.root not in str(raised.value)


def test_delete(registry, adapter_dir):
    for _ in range(3):
        registry.publish(adapter_dir)
    registry.set_alias("sentiment", "stable", 2)
    with pytest.raises(AdapterConflictError, match="aliased as stable"):
        registry.delete("sentiment", 2)
    registry.delete("sentiment", 3)
    assert registry.versions("sentiment") == [1, 2]
    with pytest.raises(AdapterNotFoundError):
        registry.delete("sentiment", 3)
    registry.delete("sentiment")
    assert registry.names() == []


def test_fetch_and_roundtrip(registry, adapter_dir, base_info, peft_state, tmp_path):
    """PEFT SEQ_CLS → import → publish → fetch → read_adapter: tensors equal the PEFT state dict."""
    registry.publish(adapter_dir)
    folder = registry.fetch("sentiment", 1)
    if registry.local:
        assert folder == registry.fetch("sentiment", 1) and str(folder).startswith(registry.root)
    else:
        assert str(folder).startswith(str(tmp_path / "cache"))
    weights = read_adapter(folder, base_info)
    assert weights.manifest.version == 1
    saved = {}
    for path, module in weights.lora.items():
        saved[f"base_model.model.{path}.lora_A.weight"] = module.A
        saved[f"base_model.model.{path}.lora_B.weight"] = module.B
    for key, tensor in weights.head.items():
        saved[f"base_model.model.{key}"] = tensor
    assert saved.keys() == peft_state.keys()
    for key, tensor in peft_state.items():
        assert torch.equal(saved[key], tensor), key


def test_fetch_refuses_corrupt_remote_copy(tmp_path, adapter_dir):
    root = f"/reg-{uuid.uuid4().hex}"
    registry = Registry(f"memory://{root}", cache_dir=tmp_path / "cache")
    registry.publish(adapter_dir)
    registry.fs.pipe_file(f"{root}/sentiment/1/README.md", b"tampered")
    with pytest.raises(AdapterValidationError, match="README.md: sha256 does not match"):
        registry.fetch("sentiment", 1)
    assert not (registry.cache_dir / "sentiment" / "1").exists()
    fsspec.filesystem("memory").rm(root, recursive=True)


def test_disk_full_during_publish_leaves_nothing(registry, adapter_dir, monkeypatch):
    registry.publish(adapter_dir)
    before = _visible(registry)
    calls = []

    def full_disk(src, dst):
        calls.append(src)
        if len(calls) == 2:
            dst.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        registry_module.shutil.copyfileobj(open(src, "rb"), dst)

    monkeypatch.setattr(registry_module, "_copy_file", full_disk)
    with pytest.raises(RegistryError, match="No space left on device"):
        registry.publish(adapter_dir)
    assert _visible(registry) == before
    assert not [
        p for p in registry.fs.ls(registry.root, detail=False) if p.rstrip("/").split("/")[-1].startswith(".")
    ]


def test_sigkill_mid_publish_leaves_no_half_adapter(tmp_path, adapter_dir):
    root = tmp_path / "reg"
    script = textwrap.dedent(
        """
        import sys, time
        from adapters import registry
        registry._after_file_written = lambda path: time.sleep(30)
        registry.Registry(sys.argv[1]).publish(sys.argv[2])
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(root), str(adapter_dir)])
    try:
        deadline = time.time() + 60
        while not any(p.is_file() for p in root.glob(".tmp-*/*")):
            assert time.time() < deadline and proc.poll() is None, "publisher never started writing"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    registry = Registry(root)
    assert registry.snapshot() == {}
    assert registry.names() == [] and registry.versions("sentiment") == []
    assert registry.publish(adapter_dir).version == 1  # the crash left nothing in the way


def test_resolve_in_is_the_rule_over_a_snapshot(registry, adapter_dir):
    """The rule the server's watch applies to one `snapshot` gives what `resolve` gives, for every ref kind."""
    for _ in range(3):
        registry.publish(adapter_dir)
    registry.set_alias("sentiment", "canary", 2)
    entry = registry.snapshot()["sentiment"]
    for text in ("sentiment", "sentiment@1", "sentiment@canary"):
        ref = AdapterRef.parse(text)
        assert resolve_in(ref, entry["versions"], entry["aliases"]) == registry.resolve(ref)
    assert registry.resolve("sentiment") == ("sentiment", 3)
    registry.set_alias("sentiment", "stable", 1)
    entry = registry.snapshot()["sentiment"]
    assert resolve_in(AdapterRef.parse("sentiment"), entry["versions"], entry["aliases"]) == ("sentiment", 1)
    for text in ("sentiment@9", "sentiment@nope"):
        with pytest.raises(AdapterNotFoundError):
            resolve_in(AdapterRef.parse(text), entry["versions"], entry["aliases"])
    with pytest.raises(AdapterNotFoundError):
        resolve_in(AdapterRef.parse("other"), [], {})
