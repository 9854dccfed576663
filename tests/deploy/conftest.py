"""Fixtures of the deployment tests: the chart rendered offline by the real Helm engine.

Helm runs in-process through helm-python-sdk (libhelm_c, Helm's Go SDK behind a C ABI): no helm
binary, no cluster, no network. The tools are declared in the `test` extra, so a missing one is a
failure, never a skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "loraswap"
GPU_VALUES_FILE = CHART_DIR / "ci" / "gpu-values.yaml"
RELEASE = "demo"
NAMESPACE = "ml"


def load_helm():
    try:
        import helm_python
    except ImportError as exc:  # the `test` extra provides it
        pytest.fail(f"helm-python-sdk is not importable ({exc}); install the `test` extra", pytrace=False)
    return helm_python


class _UniqueKeyLoader(yaml.SafeLoader):
    """A rendered manifest with a key twice is a template bug the API server would reject or hide."""


def _no_duplicates(loader, node, deep=False):
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    dupes = {k for k in keys if keys.count(k) > 1}
    if dupes:
        raise yaml.constructor.ConstructorError(
            None, None, f"duplicate keys {sorted(dupes)}", node.start_mark
        )
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


class Rendered:
    """Manifests of one `helm template`, with lookups by kind."""

    def __init__(self, files: dict[str, str]):
        self.files = files
        self.docs: list[dict] = []
        for path, text in sorted(files.items()):
            if not path.endswith((".yaml", ".yml")):
                continue
            for doc in yaml.load_all(text, Loader=_UniqueKeyLoader):
                if doc:
                    self.docs.append(doc)

    def kinds(self) -> list[str]:
        return sorted(d["kind"] for d in self.docs)

    def all(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str) -> dict:
        found = self.all(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]

    def notes(self) -> str:
        return next(text for path, text in self.files.items() if path.endswith("NOTES.txt"))


@pytest.fixture(scope="session")
def helm():
    return load_helm()


@pytest.fixture(scope="session")
def chart(helm):
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def gpu_values() -> dict:
    return yaml.safe_load(GPU_VALUES_FILE.read_text())


@pytest.fixture(scope="session")
def render(chart):
    def _render(values: dict | None = None) -> Rendered:
        return Rendered(chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True))

    return _render


@pytest.fixture(scope="session")
def default_render(render) -> Rendered:
    return render(None)


@pytest.fixture(scope="session")
def gpu_render(render, gpu_values) -> Rendered:
    return render(gpu_values)


@pytest.fixture(scope="session")
def chart_dir() -> Path:
    return CHART_DIR


@pytest.fixture(scope="session")
def exported_metrics():
    """tests/deploy/metric_names.py, loaded by path (test directories are not packages)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "loraswap_metric_names", Path(__file__).with_name("metric_names.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
