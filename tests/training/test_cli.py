"""`loraswap train` / `loraswap eval` as a user runs them: exit codes and one-line errors, no tracebacks."""

from __future__ import annotations

import pytest

from adapters.cli import main as loraswap_main
from tests.training.helpers import run_cli


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr[-3000:]}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def test_missing_data_folder_exits_1_with_one_line(tmp_path):
    proc = run_cli("train", "--name", "x", "--data", tmp_path / "no-such-data",
                   "--output-dir", tmp_path / "run")
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    assert str(tmp_path / "no-such-data") in line and "no such data folder" in line
    assert proc.stdout == ""


def test_unknown_set_key_exits_1(tmp_path):
    proc = run_cli("train", "--name", "x", "--data", tmp_path, "--set", "no_such_key=3")
    assert proc.returncode == 1
    assert "unknown recipe key 'no_such_key'" in _one_error_line(proc.stderr)


def test_set_without_equals_exits_1(tmp_path):
    proc = run_cli("train", "--name", "x", "--data", tmp_path, "--set", "lora_r")
    assert proc.returncode == 1
    assert "--set expects key=value" in _one_error_line(proc.stderr)


@pytest.mark.parametrize("args", [["train", "--no-such-flag"], ["train", "--lora-r", "many"], ["eval"]])
def test_usage_errors_exit_2(args):
    proc = run_cli(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "usage:" in proc.stderr and "Traceback" not in proc.stderr


# The next two run the same `loraswap` root in process (torch is already imported: seconds saved).


def test_resume_without_checkpoint_exits_1(tmp_path, sst2_slice, capsys):
    (tmp_path / "run").mkdir()
    code = loraswap_main(["train", "--name", "x", "--data", str(sst2_slice),
                          "--output-dir", str(tmp_path / "run"), "--resume"])
    assert code == 1
    assert _one_error_line(capsys.readouterr().err) == f"error: --resume: no checkpoint in {tmp_path / 'run'}"


def test_eval_of_a_folder_that_is_not_an_adapter_exits_1(tmp_path, sst2_slice, capsys):
    assert loraswap_main(["eval", str(tmp_path), "--data", str(sst2_slice)]) == 1
    assert "no adapter_config.json" in _one_error_line(capsys.readouterr().err)
