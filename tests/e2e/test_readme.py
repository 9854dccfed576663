"""The README is true: every `curl`, `loraswap` and Python example in it runs against a live server
serving the shipped adapters on the real embedded bases.

Two substitutions keep the run safe and CI-sized: commands use a copy of registry/ (the repo's
copy is never written), and `loraswap train` lines get quick-run flags appended (few rows and steps);
the full recipes are exercised by `make adapters`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from live import live_server

pytestmark = pytest.mark.real_model

BIN = Path(sys.executable).parent
QUICK_TRAIN = ["--max-train-rows", "64", "--max-steps", "2", "--eval-steps", "2", "--set", "max_eval_rows=32"]


def readme_blocks(repo_root: Path, lang: str) -> list[str]:
    text = (repo_root / "README.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def shell_commands(repo_root: Path) -> list[str]:
    lines = []
    for block in readme_blocks(repo_root, "bash"):
        for line in block.splitlines():
            line = line.strip()
            if line.startswith(("curl ", ".venv/bin/loraswap ")):
                lines.append(line)
    return lines


@pytest.fixture(scope="module")
def server(tmp_path_factory, repo_root):
    registry = tmp_path_factory.mktemp("readme") / "registry"
    shutil.copytree(repo_root / "registry", registry)
    with live_server(registry, env={"LORASWAP_WATCH_INTERVAL_S": "1"}, timeout=400) as url:
        yield url, registry


def _run(cmd: str, cwd: Path) -> str:
    done = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_readme_has_the_tour(repo_root):
    cmds = shell_commands(repo_root)
    assert any("/v1/classify" in c for c in cmds) and any("/v1/chat/completions" in c for c in cmds)
    assert any(" train " in c for c in cmds)


def test_readme_commands_run(server, repo_root):
    url, registry = server
    for cmd in shell_commands(repo_root):
        cmd = cmd.replace("localhost:8000", url.removeprefix("http://"))
        cmd = cmd.replace(".venv/bin/loraswap", str(BIN / "loraswap")).replace("--registry registry",
                                                                               f"--registry {registry}")
        if " train " in cmd:
            cmd += " " + " ".join(QUICK_TRAIN) + f" --output-dir {registry.parent / 'run'}"
        out = _run(cmd, repo_root)
        if "/v1/" in cmd:
            body = json.loads(out)
            assert "error" not in body, (cmd, body)
        if '"adapter":"sentiment"' in cmd and "/v1/classify" in cmd:
            labels = [r["label"] for r in json.loads(out)["results"]]
            assert labels == ["positive", "negative"], out
        if "/metrics" in cmd:
            assert "loraswap_requests_total" in out


def test_readme_python_example(server, repo_root):
    url, _ = server
    (snippet,) = [b for b in readme_blocks(repo_root, "python") if "OpenAI(" in b]
    code = snippet.replace("http://127.0.0.1:8000", url)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), "the example printed no reply"
