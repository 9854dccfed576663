"""The Helm chart (helm/loraswap): lint, schema, Kubernetes validation, and what it wires together.

Rendering and linting use the real Helm engine in-process (helm-python-sdk); every rendered
object is validated with kubernetes-validate --strict against the Kubernetes OpenAPI schemas it
ships, for the oldest Kubernetes the chart supports and the newest the validator knows.
"""

from __future__ import annotations

import json

import pytest
import yaml

# Kubernetes versions to validate against: the chart's kubeVersion floor (>=1.29) rounded up to a
# release with schemas in kubernetes-validate, and the newest release it ships.
KUBE_VERSIONS = ("1.30.0", "latest")

# CRD kinds kubernetes-validate has no schema for. Only these may be skipped, each named with its
# apiVersion: anything else without a schema (a typo in apiVersion, say) fails.
ALLOWED_UNKNOWN_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("inference.networking.k8s.io/v1", "InferencePool"),
    ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
}

# yamllint for the chart's plain YAML (templates are Go templates, not YAML, and are checked by
# rendering instead).
YAMLLINT_CONFIG = """
extends: default
rules:
  line-length: {max: 120}
  document-start: disable
  truthy: {check-keys: false}
  comments: {min-spaces-from-content: 1}
"""


def _kube_version(version: str) -> str:
    from kubernetes_validate import utils

    return utils.latest_version() if version == "latest" else version


def _container(deployment: dict, name: str = "server") -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _volume(pod_spec: dict, name: str) -> dict:
    return next(v for v in pod_spec["volumes"] if v["name"] == name)


def _mount_for(container: dict, path: str) -> dict:
    """The volume mount whose mountPath contains `path`."""
    matches = [
        m
        for m in container["volumeMounts"]
        if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")
    ]
    assert matches, f"{path} is on no volume mount of {container['name']}"
    return max(matches, key=lambda m: len(m["mountPath"]))


# --- helm lint and schema ---------------------------------------------------------------------


@pytest.mark.parametrize("values_name", ["default", "gpu"])
def test_helm_lint_strict_is_clean(helm, chart_dir, gpu_values, values_name):
    values = gpu_values if values_name == "gpu" else None
    report = helm.lint(chart_dir, values, strict=True, namespace="ml", kube_version="v1.30.0")
    assert report["total_charts_linted"] == 1
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert not problems and not report["errors"], problems or report["errors"]


@pytest.mark.parametrize(
    "bad_values, where",
    [
        ({"replicaCount": "two"}, "/replicaCount"),
        ({"server": {"port": "8000"}}, "/server/port"),
        ({"replicas": 2}, "replicas"),  # a typo of replicaCount: unknown keys are refused
        ({"registry": {"url": "bucket/adapters"}}, "/registry/url"),  # not a URL
        ({"auth": {"keys": [{"scopes": ["infer"]}]}}, "/auth/keys/0"),  # neither key nor key_sha256
        ({"auth": {"keys": [{"key": "k" * 16, "scopes": ["metric"]}]}}, "/auth/keys/0/scopes/0"),
        ({"serviceMonitor": {"bearerTokenSecret": {"name": "metrics-key"}}}, "/serviceMonitor/bearerTokenSecret"),
        ({"serviceMonitor": {"bearerTokenSecret": {"name": "k", "key": "t", "token": "x"}}},
         "/serviceMonitor/bearerTokenSecret"),
        (
            {"inferenceExtension": {"objectives": [{"name": "Bad_Name"}]}},
            "/inferenceExtension/objectives/0/name",
        ),
    ],
)
def test_bad_values_fail_the_schema(helm, chart, chart_dir, bad_values, where):
    with pytest.raises(helm.HelmValuesError) as failed:
        chart.validate_schema(bad_values)
    assert where in str(failed.value)
    # An install renders with the same check: it fails before any object is sent.
    with pytest.raises(helm.HelmValuesError):
        chart.render(bad_values, name="demo", namespace="ml", is_install=True)
    report = helm.lint(chart_dir, bad_values, namespace="ml")
    assert any(m["severity"] == 3 for m in report["messages"]), report


def test_values_files_pass_the_schema(chart, gpu_values):
    chart.validate_schema(None)
    chart.validate_schema(gpu_values)
    chart.validate_schema({"auth": {"keys": [{"key": "m" * 16, "scopes": ["metrics"], "adapters": ["team-a-*"]}]}})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"preStopSleepSeconds": 30, "terminationGracePeriodSeconds": 20}, "terminationGracePeriodSeconds"),
        ({"registry": {"persistence": {"enabled": False}}}, "registry.url"),
        ({"inferenceExtension": {"enabled": True}}, "endpointPicker.serviceName"),
        # /metrics needs a key when auth is on: a ServiceMonitor without one would only collect 401s.
        ({"serviceMonitor": {"enabled": True}}, "serviceMonitor.bearerTokenSecret"),
    ],
)
def test_inconsistent_values_fail_to_render(helm, render, values, message):
    with pytest.raises(helm.HelmRenderError, match=message.replace(".", r"\.")):
        render(values)


def test_chart_plain_yaml_passes_yamllint(chart_dir):
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(YAMLLINT_CONFIG)
    files = sorted(p for p in chart_dir.rglob("*.y*ml") if "templates" not in p.parts)
    assert {p.name for p in files} >= {"Chart.yaml", "values.yaml", "gpu-values.yaml"}
    problems = [
        f"{p.relative_to(chart_dir)}:{problem.line}:{problem.column} {problem.message}"
        for p in files
        for problem in linter.run(p.read_text(), config, str(p))
    ]
    assert not problems, "\n".join(problems)


# --- Kubernetes validation ----------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("values_name", ["default", "gpu"])
def test_every_manifest_validates_strictly(default_render, gpu_render, values_name, version):
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    rendered = gpu_render if values_name == "gpu" else default_render
    kube = _kube_version(version)
    validated, skipped, errors = [], [], []
    for doc in rendered.docs:
        ident = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, kube, strict=True)
            validated.append(ident)
        except SchemaNotFoundError:
            if (doc["apiVersion"], doc["kind"]) not in ALLOWED_UNKNOWN_KINDS:
                errors.append(f"{ident}: no schema for {doc['apiVersion']} in Kubernetes {kube}")
            skipped.append(ident)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{ident}: {exc.message} at {'/'.join(map(str, exc.path))}")
    assert not errors, "\n".join(errors)
    assert len(validated) >= 9, validated  # the core objects were really checked, not skipped


def test_strict_validation_is_not_vacuous(default_render):
    """The validator rejects an unknown field in our own Deployment: --strict is in force."""
    import copy

    import kubernetes_validate

    broken = copy.deepcopy(default_render.one("Deployment"))
    _container(broken)["readinessProbe"]["httpGett"] = {"path": "/ready"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, _kube_version("latest"), strict=True)


def test_default_and_gpu_render_the_expected_objects(default_render, gpu_render):
    assert default_render.kinds() == sorted(
        [
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "NetworkPolicy",
            "PersistentVolumeClaim",
            "PodDisruptionBudget",
            "Secret",
            "Service",
            "ServiceAccount",
        ]
    )
    gpu_kinds = gpu_render.kinds()
    for kind in ("HorizontalPodAutoscaler", "ServiceMonitor", "InferencePool", "Job", "HTTPRoute"):
        assert kind in gpu_kinds
    assert gpu_kinds.count("InferenceObjective") == 2
    # An s3:// registry and an existing Secret: no PVC, no generated Secret.
    assert "PersistentVolumeClaim" not in gpu_kinds and "Secret" not in gpu_kinds


# --- what the Deployment wires together ----------------------------------------------------------


@pytest.mark.parametrize("values_name", ["default", "gpu"])
def test_probes_ports_and_service_agree(default_render, gpu_render, values_name):
    rendered = gpu_render if values_name == "gpu" else default_render
    deployment = rendered.one("Deployment")
    server = _container(deployment)
    port = int(_env(server)["LORASWAP_PORT"])
    named = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert named == {"http": port}

    assert server["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/health"
    assert server["startupProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert named[server[probe]["httpGet"]["port"]] == port

    service = rendered.one("Service")
    (service_port,) = service["spec"]["ports"]
    target = service_port["targetPort"]
    assert (named[target] if isinstance(target, str) else target) == port
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert _env(server)["LORASWAP_HOST"] == "0.0.0.0"


def test_graceful_drain(default_render, gpu_render, gpu_values):
    for rendered in (default_render, gpu_render):
        deployment = rendered.one("Deployment")
        pod = deployment["spec"]["template"]["spec"]
        sleep = _container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep"
        assert pod["terminationGracePeriodSeconds"] > int(sleep[1])
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    gpu_pod = gpu_render.one("Deployment")["spec"]["template"]["spec"]
    assert gpu_pod["terminationGracePeriodSeconds"] == gpu_values["terminationGracePeriodSeconds"]


def test_api_keys_come_from_the_mounted_secret(default_render):
    deployment = default_render.one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    server = _container(deployment)
    env = _env(server)
    assert env["LORASWAP_AUTH_ENABLED"] == "true"
    keys_file = env["LORASWAP_API_KEYS_FILE"]
    mount = _mount_for(server, keys_file)
    assert mount["readOnly"] is True
    volume = _volume(pod, mount["name"])
    secret = default_render.one("Secret")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    item = keys_file[len(mount["mountPath"]) + 1 :]
    assert [i["path"] for i in volume["secret"]["items"]] == [item]
    assert volume["secret"]["items"][0]["key"] in secret["data"]
    # No keys given: one generated admin key, a usable JSON list in the server's format.
    import base64

    keys = json.loads(base64.b64decode(secret["data"][volume["secret"]["items"][0]["key"]]))
    assert len(keys) == 1 and len(keys[0]["key"]) >= 32 and keys[0]["scopes"] == ["infer", "admin"]
    assert "LORASWAP_API_KEYS" not in env  # keys never travel inline in the pod spec
    assert "LORASWAP_METRICS_OPEN" not in env  # auth on, no endpoint picker: /metrics needs a key


def test_existing_secret_and_given_keys(render, gpu_render):
    deployment = gpu_render.one("Deployment")
    volume = _volume(deployment["spec"]["template"]["spec"], "api-keys")
    assert volume["secret"]["secretName"] == "loraswap-api-keys"

    digest = "a" * 64
    rendered = render(
        {"auth": {"keys": [{"key_sha256": digest, "scopes": ["infer"], "adapters": ["support-*"]}]}}
    )
    import base64

    data = rendered.one("Secret")["data"]["api-keys.json"]
    assert json.loads(base64.b64decode(data)) == [
        {"key_sha256": digest, "scopes": ["infer"], "adapters": ["support-*"]}
    ]

    off = render({"auth": {"enabled": False}})
    assert "Secret" not in off.kinds()
    env = _env(_container(off.one("Deployment")))
    assert env["LORASWAP_AUTH_ENABLED"] == "false" and "LORASWAP_API_KEYS_FILE" not in env
    assert "Authentication is OFF" in off.notes()


def test_config_map_is_mounted_as_the_config_file(render):
    rendered = render({"config": {"metrics": {"max_adapter_labels": 50}}})
    deployment = rendered.one("Deployment")
    server = _container(deployment)
    config_file = _env(server)["LORASWAP_CONFIG"]
    mount = _mount_for(server, config_file)
    volume = _volume(deployment["spec"]["template"]["spec"], mount["name"])
    config_maps = {c["metadata"]["name"]: c for c in rendered.all("ConfigMap")}
    data = config_maps[volume["configMap"]["name"]]["data"]
    assert yaml.safe_load(data[config_file.rsplit("/", 1)[1]]) == {"metrics": {"max_adapter_labels": 50}}


def test_security_context(default_render, gpu_render):
    for rendered in (default_render, gpu_render):
        for workload in rendered.all("Deployment") + rendered.all("Job"):
            pod = workload["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] != 0
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
            assert pod["automountServiceAccountToken"] is False
            for container in pod["containers"] + pod.get("initContainers", []):
                sc = container["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True, container["name"]
                assert sc["allowPrivilegeEscalation"] is False, container["name"]
                assert sc["capabilities"]["drop"] == ["ALL"], container["name"]
                assert "add" not in sc["capabilities"]
            # The read-only root needs writable emptyDirs for /tmp and the cache.
            main = pod["containers"][0]
            cache_dir = _env(main)["LORASWAP_CACHE_DIR"]
            for path in ("/tmp", cache_dir):
                assert "emptyDir" in _volume(pod, _mount_for(main, path)["name"]), path


def test_registry_is_shared_by_server_and_training_job(render, gpu_render):
    # Object storage (gpu values): the same URL, no volume.
    deployment, job = gpu_render.one("Deployment"), gpu_render.one("Job")
    server, trainer = _container(deployment), job["spec"]["template"]["spec"]["containers"][0]
    url = _env(server)["LORASWAP_REGISTRY"]
    assert url == "s3://ml-adapters/loraswap"
    assert _env(trainer)["LORASWAP_REGISTRY"] == url
    assert trainer["args"][:2] == ["train", "/opt/loraswap/recipes/sentiment.yaml"]
    assert trainer["args"][trainer["args"].index("--registry") + 1] == url
    assert server["envFrom"] == trainer["envFrom"]  # the same storage credentials

    # A volume (defaults + training): the same claim mounted at the same path.
    rendered = render({"training": {"enabled": True, "set": {"epochs": 1}}})
    deployment, job = rendered.one("Deployment"), rendered.one("Job")
    server, trainer = _container(deployment), job["spec"]["template"]["spec"]["containers"][0]
    path = _env(server)["LORASWAP_REGISTRY"]
    assert _env(trainer)["LORASWAP_REGISTRY"] == path
    assert trainer["args"][trainer["args"].index("--registry") + 1] == path
    assert ["--set", "epochs=1"] == trainer["args"][-2:]
    claims = []
    for workload, container in ((deployment, server), (job, trainer)):
        volume = _volume(workload["spec"]["template"]["spec"], _mount_for(container, path)["name"])
        claims.append(volume["persistentVolumeClaim"]["claimName"])
    assert claims[0] == claims[1] == rendered.one("PersistentVolumeClaim")["metadata"]["name"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_gpu_values_request_gpus(default_render, gpu_render):
    server = _container(gpu_render.one("Deployment"))
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _env(server)["LORASWAP_DEVICE"] == "cuda"
    assert server["image"].endswith("-cuda")
    pod = gpu_render.one("Deployment")["spec"]["template"]["spec"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    trainer = gpu_render.one("Job")["spec"]["template"]["spec"]["containers"][0]
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 1

    cpu_server = _container(default_render.one("Deployment"))
    assert "nvidia.com/gpu" not in json.dumps(cpu_server["resources"])
    assert _env(cpu_server)["LORASWAP_DEVICE"] == "cpu" and cpu_server["image"].endswith("-cpu")


def test_preload_list(gpu_render, gpu_values):
    env = _env(_container(gpu_render.one("Deployment")))
    assert env["LORASWAP_PRELOAD"].split(",") == gpu_values["server"]["preload"]


def test_hpa_scales_on_cpu_and_queue_depth(gpu_render):
    hpa = gpu_render.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == gpu_render.one("Deployment")["metadata"]["name"]
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "loraswap_engine_waiting_requests"
    assert "replicas" not in gpu_render.one("Deployment")["spec"]  # the HPA owns the count


def test_service_monitor_scrapes_metrics(gpu_render, gpu_values):
    monitor = gpu_render.one("ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    # auth is on: the scrape carries a key (metrics scope) from the given Secret
    assert endpoint["authorization"] == {"type": "Bearer",
                                         "credentials": gpu_values["serviceMonitor"]["bearerTokenSecret"]}
    service = gpu_render.one("Service")
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_service_monitor_without_auth_sends_no_token(render):
    monitor = render({"auth": {"enabled": False}, "serviceMonitor": {"enabled": True}}).one("ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and "authorization" not in endpoint


def test_pdb_network_policy_and_spread(gpu_render):
    pod_labels = gpu_render.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    pdb = gpu_render.one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    policy = gpu_render.one("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}] and len(rule["from"]) == 2
    (spread,) = gpu_render.one("Deployment")["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"].items() <= pod_labels.items()


def test_inference_extension_objects(gpu_render, gpu_values):
    pool = gpu_render.one("InferencePool")
    pod_labels = gpu_render.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    env = _env(_container(gpu_render.one("Deployment")))
    assert pool["spec"]["targetPorts"] == [{"number": int(env["LORASWAP_PORT"])}]
    # auth is on in these values: the picker, which sends no key, still reads every pod's vllm:* gauges
    assert env["LORASWAP_AUTH_ENABLED"] == "true" and env["LORASWAP_METRICS_OPEN"] == "true"
    assert pool["spec"]["endpointPickerRef"]["name"] == "loraswap-epp"
    objectives = {o["metadata"]["name"]: o for o in gpu_render.all("InferenceObjective")}
    assert set(objectives) == {o["name"] for o in gpu_values["inferenceExtension"]["objectives"]}
    for objective in objectives.values():
        ref = objective["spec"]["poolRef"]
        assert (ref["group"], ref["kind"], ref["name"]) == (
            "inference.networking.k8s.io",
            "InferencePool",
            pool["metadata"]["name"],
        )
    (rule,) = gpu_render.one("HTTPRoute")["spec"]["rules"]
    assert rule["backendRefs"][0]["name"] == pool["metadata"]["name"]


def test_dashboard_config_map(default_render, chart_dir):
    (dashboard,) = [
        c for c in default_render.all("ConfigMap") if c["metadata"]["labels"].get("grafana_dashboard")
    ]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((chart_dir / "dashboards" / "loraswap.json").read_text())
    assert json.loads(dashboard["data"]["loraswap.json"]) == shipped


def test_notes_tell_how_to_call_it(default_render):
    notes = default_render.notes()
    assert "port-forward svc/demo-loraswap" in notes
    assert "/v1/classify" in notes and "/v1/chat/completions" in notes
    assert "Authorization: Bearer" in notes and "get secret demo-loraswap-api-keys" in notes


def test_values_yaml_is_documented_line_by_line(chart_dir):
    """Every value in values.yaml has a comment right above it or above an enclosing block."""
    lines = (chart_dir / "values.yaml").read_text().splitlines()
    undocumented = []
    open_blocks: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        while open_blocks and open_blocks[-1][0] >= indent:
            open_blocks.pop()
        if stripped.startswith("- ") or ":" not in stripped:
            continue  # list items belong to the key above
        documented = lines[i - 1].strip().startswith("#") or any(doc for _, doc in open_blocks)
        key, _, value = stripped.partition(":")
        if value.strip():
            if not documented:
                undocumented.append(key)
        else:
            open_blocks.append((indent, documented))
    assert not undocumented, f"values without a comment: {undocumented}"
