"""helm/trimvlm: linted and rendered with helm-python-sdk (Helm's own Go library; no helm binary,
no cluster) for several values sets; every rendered manifest validated against the Kubernetes
OpenAPI schemas with kubernetes-validate (strict: unknown fields fail); the monitoring.coreos.com
CRDs checked structurally and their rules with promtool."""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import CHART, DASHBOARD, RULES, find_tool, run

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (in the dev extra)")
kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (in the dev extra)")

# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas we have.
KUBE_VERSIONS = ["1.25.0", kv.latest_version()]
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}

VALUES_SETS = {
    "defaults": {},
    "gpu": {
        "gpu": {"enabled": True, "tensorrtCache": {"existingClaim": "trimvlm-trt-cache"}},
        "ingress": {"enabled": True, "className": "nginx", "tls": [{"hosts": ["trimvlm.local"], "secretName": "trimvlm-tls"}]},
        "apiKey": {"enabled": True, "value": "s3cret"},
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}},
    },
    "pvc-hpa-monitoring": {
        "models": {"source": "pvc", "pvc": {"claimName": "trimvlm-models", "subPath": "repo"}},
        "autoscaling": {"enabled": True, "queueMetric": {"enabled": True}},
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
        "networkPolicy": {"enabled": True},
        "gallery": {"existingClaim": "trimvlm-gallery"},
        "config": {"maxBodyBytes": 33554432, "intraOpThreads": 2},
    },
    "init-container": {
        "models": {"source": "initContainer", "initContainer": {"env": {"MODELS_URL": "https://models.example/repo.tar.gz"}}},
        "podDisruptionBudget": {"enabled": True, "minAvailable": 1},
        "apiKey": {"enabled": True, "existingSecret": "my-api-key"},
        "extraEnv": {"TRIMVLM_ALLOW_URLS": "true", "TRIMVLM_URL_ALLOWLIST": '["images.example"]'},
        "replicaCount": 1,
    },
    "embedded-gallery-one-replica": {"gallery": {"backend": "embedded", "existingClaim": "trimvlm-gallery"}, "replicaCount": 1},
    "chroma-existing-server": {
        "gallery": {"chroma": {"url": "http://chroma.databases:8000", "collection": "prod"}},
        "autoscaling": {"enabled": True},
    },
    "chroma-deployed-no-persistence": {"gallery": {"chroma": {"persistence": {"enabled": False}}}, "replicaCount": 3},
}


@pytest.fixture(scope="module")
def chart():
    c = helm.Chart.load(CHART)
    yield c
    c.close()


def render(chart, values: dict) -> tuple[list[dict], str]:
    out = chart.render(values, name="trimvlm", namespace="ml", is_install=True)
    docs = [d for path, text in sorted(out.items()) if path.endswith((".yaml", ".yml")) for d in yaml.safe_load_all(text) if d]
    return docs, out.get("trimvlm/templates/NOTES.txt", "")


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    (doc,) = by_kind(docs, kind)
    return doc


def env_config(docs: list[dict]) -> dict:
    """The ConfigMap holding the TRIMVLM_* environment (not the dashboard's)."""
    (doc,) = [d for d in by_kind(docs, "ConfigMap") if not d["metadata"]["name"].endswith("-dashboard")]
    return doc


@pytest.mark.parametrize("values", VALUES_SETS.values(), ids=VALUES_SETS.keys())
def test_lint(values):
    report = helm.lint(CHART, values, strict=True, kube_version="v1.30.0")
    assert not report["errors"], report
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems, problems


@pytest.mark.parametrize("name", VALUES_SETS)
def test_rendered_manifests_are_valid_kubernetes(chart, name):
    docs, notes = render(chart, VALUES_SETS[name])
    assert notes.strip(), "NOTES.txt renders"
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount", "PodDisruptionBudget"} <= kinds
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue  # no OpenAPI schema for CRDs here: checked structurally below
        for version in KUBE_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                where = f"{doc['kind']}/{doc['metadata']['name']}"
                pytest.fail(f"{name}: {where} invalid for Kubernetes {version}: {e.message} at {list(e.path)}")


def test_schema_rejects_bad_values(chart):
    for bad in (
        {"models": {"source": "s3"}},
        {"gpu": {"count": 0}},
        {"config": {"maxBodyBytes": "16MB"}},
        {"config": {"device": "tpu"}},
        {"replicas": 3},  # a typo of replicaCount
        {"serviceMonitor": {"interval": "often"}},
    ):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(bad)
    with pytest.raises(helm.HelmError):
        chart.render({"models": {"source": "pvc"}}, name="trimvlm")  # no claimName
    with pytest.raises(helm.HelmError):
        chart.render({"apiKey": {"enabled": True}}, name="trimvlm")  # neither a value nor a Secret


def test_deployment_defaults(chart):
    docs, _ = render(chart, {})
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == f"trimvlm:{chart.metadata['appVersion']}"
    assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    startup_s = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    assert startup_s >= 120, "model load + warm-up fit in the startup probe"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", "/data/gallery"} <= mounts, "writable emptyDirs under a read-only root"
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    # drain: preStop sleep, then uvicorn's graceful shutdown, inside the grace period
    cm = env_config(docs)["data"]
    sleep_s = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > sleep_s + float(cm["TRIMVLM_GRACEFUL_SHUTDOWN_S"])
    assert cm["TRIMVLM_HOST"] == "0.0.0.0" and cm["TRIMVLM_MODELS_DIR"] == "/app/models" and cm["TRIMVLM_DEVICE"] == "cpu"
    assert c["envFrom"] == [{"configMapRef": {"name": env_config(docs)["metadata"]["name"]}}]
    assert dep["spec"]["replicas"] == 2 and not by_kind(docs, "HorizontalPodAutoscaler")
    assert not by_kind(docs, "ServiceMonitor") and not by_kind(docs, "PrometheusRule") and not by_kind(docs, "Ingress")
    svc = one([d for d in docs if not d["metadata"]["name"].endswith("-chroma")], "Service")  # not the gallery database
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_config_env_names_are_service_settings(chart):
    """Every TRIMVLM_* the chart sets is a field of service/settings.py (a typo would be ignored
    silently: the settings ignore unknown variables)."""
    from service.settings import Settings

    # settings the images and chart already set but the service does not read yet
    pending = {"TRIMVLM_TENSORRT_CACHE_DIR"}
    fields = {f"TRIMVLM_{name.upper()}" for name in Settings.model_fields}
    for values in VALUES_SETS.values():
        docs, _ = render(chart, values)
        env = set(env_config(docs)["data"])
        container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
        env |= {e["name"] for e in container.get("env", [])}
        unknown = {k for k in env if k.startswith("TRIMVLM_")} - fields - pending
        assert not unknown, unknown


def test_gpu_values(chart):
    docs, notes = render(chart, VALUES_SETS["gpu"])
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"].endswith("-gpu")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["limits"]["cpu"] == "4", "user resources are kept next to the GPU limit"
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600, "room for a TensorRT engine build"
    cm = env_config(docs)["data"]
    assert cm["TRIMVLM_DEVICE"] == "tensorrt" and cm["TRIMVLM_TENSORRT_CACHE_DIR"] == "/cache/trt"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["trt-cache"]["persistentVolumeClaim"]["claimName"] == "trimvlm-trt-cache"
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    # API key from a Secret the chart made
    secret = one(docs, "Secret")
    ref = c["env"][0]["valueFrom"]["secretKeyRef"]
    assert c["env"][0]["name"] == "TRIMVLM_API_KEY" and ref["name"] == secret["metadata"]["name"]
    assert base64.b64decode(secret["data"][ref["key"]]).decode() == "s3cret"
    # Ingress body limit = the app's limit
    ing = one(docs, "Ingress")
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] == cm["TRIMVLM_MAX_BODY_BYTES"]
    assert ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"] == {"name": "http"}
    assert "https://trimvlm.local" in notes and "TensorRT" in notes


def test_pvc_hpa_monitoring_values(chart):
    docs, _ = render(chart, VALUES_SETS["pvc-hpa-monitoring"])
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"] == {"claimName": "trimvlm-models", "readOnly": True}
    mount = next(m for m in c["volumeMounts"] if m["name"] == "models")
    assert mount["readOnly"] is True and mount["subPath"] == "repo"
    cm = env_config(docs)["data"]
    assert cm["TRIMVLM_MODELS_DIR"] == mount["mountPath"] and cm["TRIMVLM_MAX_BODY_BYTES"] == "33554432"
    assert cm["TRIMVLM_INTRA_OP_THREADS"] == "2"

    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "vlm_avg_queue_seconds"
    assert metrics["Pods"]["pods"]["target"] == {"type": "AverageValue", "averageValue": "20m"}

    svc = one([d for d in docs if not d["metadata"]["name"].endswith("-chroma")], "Service")  # not the gallery database
    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]} and endpoint["path"] == "/metrics"
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "trimvlm", 'job="trimvlm", as the rules expect'
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}

    dash = one([d for d in docs if d["metadata"]["name"].endswith("-dashboard")], "ConfigMap")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["trimvlm.json"]) == json.loads(DASHBOARD.read_text())

    netpol = one(docs, "NetworkPolicy")
    assert netpol["spec"]["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_prometheus_rule_matches_compose_rules(chart):
    """With default thresholds the PrometheusRule is docker/prometheus/rules.yml, group for group."""
    docs, _ = render(chart, {"prometheusRule": {"enabled": True}})
    rule = one(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_prometheus_rule_thresholds_and_promtool(chart, tmp_path):
    values = {"prometheusRule": {"enabled": True, "p99SloSeconds": 0.5, "errorRatio": 0.01, "queueSaturationRatio": 0.5}}
    docs, _ = render(chart, values)
    groups = one(docs, "PrometheusRule")["spec"]["groups"]
    alerts = {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}
    assert alerts["TrimVLMHighP99Latency"]["expr"].endswith("> 0.5")
    assert "> 0.01" in alerts["TrimVLMHighErrorRate"]["expr"]
    assert "0.5 * max by (instance, model, component) (vlm_queue_capacity)" in alerts["TrimVLMQueueSaturated"]["expr"]
    promtool = find_tool("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install -y prometheus): rendered rules not checked")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    res = run([promtool, "check", "rules", str(path)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_init_container_values(chart):
    docs, notes = render(chart, VALUES_SETS["init-container"])
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert {"name": "MODELS_URL", "value": "https://models.example/repo.tar.gz"} in init["env"]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert "emptyDir" in models
    assert next(m for m in init["volumeMounts"] if m["name"] == "models")["mountPath"] == "/models"
    (c,) = pod["containers"]
    assert next(m for m in c["volumeMounts"] if m["name"] == "models")["readOnly"] is True
    assert c["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "my-api-key"
    assert not by_kind(docs, "Secret"), "an existing Secret is used as is"
    assert one(docs, "PodDisruptionBudget")["spec"] == {
        "minAvailable": 1,
        "selector": one(docs, "Deployment")["spec"]["selector"],
    }
    cm = env_config(docs)["data"]
    assert cm["TRIMVLM_ALLOW_URLS"] == "true" and json.loads(cm["TRIMVLM_URL_ALLOWLIST"]) == ["images.example"]
    assert "blocks voluntary evictions" in notes


def test_chart_files_are_in_the_package(chart):
    """The dashboard reaches the chart through a symlink (files/ -> docker/grafana): Helm
    follows it, so a packaged chart carries the file itself."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(chart.save(tmp))
        packaged = helm.Chart.load(archive)
        try:
            names = {f["name"] for f in packaged.files}
            assert "files/trimvlm-dashboard.json" in names
        finally:
            packaged.close()


def test_shared_gallery_by_default_deploys_a_persistent_chroma(chart):
    """replicaCount 2 by default: every replica reads and writes one Chroma server the chart deploys."""
    docs, notes = render(chart, {})
    cm = env_config(docs)["data"]
    (sts,) = by_kind(docs, "StatefulSet")
    services = {d["metadata"]["name"]: d for d in by_kind(docs, "Service")}
    assert cm["TRIMVLM_GALLERY_BACKEND"] == "chroma" and cm["TRIMVLM_GALLERY_URL"] == f"http://{sts['metadata']['name']}:8000"
    assert {"TRIMVLM_GALLERY_COLLECTION", "TRIMVLM_GALLERY_TIMEOUT_S", "TRIMVLM_GALLERY_RETRY_S"} <= set(cm)
    chroma_svc = services[sts["metadata"]["name"]]
    assert chroma_svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    dep = one(docs, "Deployment")
    app_labels = dep["spec"]["selector"]["matchLabels"]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert not all(pod_labels.get(k) == v for k, v in app_labels.items()), "the app's Service must not select the database"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/api/v2/heartbeat"
    assert "shared by every replica" in notes and "PersistentVolumeClaim" in notes


def test_existing_chroma_server_deploys_none(chart):
    docs, _ = render(chart, VALUES_SETS["chroma-existing-server"])
    assert not by_kind(docs, "StatefulSet") and len(by_kind(docs, "Service")) == 1
    cm = env_config(docs)["data"]
    assert cm["TRIMVLM_GALLERY_URL"] == "http://chroma.databases:8000" and cm["TRIMVLM_GALLERY_COLLECTION"] == "prod"
    assert by_kind(docs, "HorizontalPodAutoscaler")


@pytest.mark.parametrize(
    "values, words",
    [
        ({"gallery": {"backend": "embedded"}}, ["replicaCount=2", "gallery.backend=chroma"]),
        ({"gallery": {"backend": "embedded"}, "replicaCount": 3}, ["replicaCount=3"]),
        ({"gallery": {"backend": "embedded"}, "replicaCount": 1, "autoscaling": {"enabled": True}}, ["HPA", "autoscaling"]),
    ],
    ids=["embedded-default-replicas", "embedded-3-replicas", "embedded-hpa"],
)
def test_embedded_gallery_refuses_more_than_one_pod(chart, values, words):
    with pytest.raises(helm.HelmError) as e:
        chart.render(values, name="trimvlm")
    assert "gallery.backend=embedded" in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    docs, _ = render(chart, VALUES_SETS["embedded-gallery-one-replica"])
    assert env_config(docs)["data"]["TRIMVLM_GALLERY_BACKEND"] == "embedded" and not by_kind(docs, "StatefulSet")
    assert "TRIMVLM_GALLERY_URL" not in env_config(docs)["data"]
