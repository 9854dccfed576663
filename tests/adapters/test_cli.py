import json
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.cli import main
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
    assert json.loads(out) == {"sentiment": {"versions": [1, 2], "aliases": {"stable": 1}}}
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
    assert code == 1 and "Traceback" in err and err.rstrip().endswith("not found in registry " + str(reg))


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
