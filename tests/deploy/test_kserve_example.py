"""docs/kserve-inferenceservice.yaml, the KServe InferenceService example (docs/PROTOCOLS.md): its pod
spec is valid Kubernetes, the port, probes and settings it names are the service's, and the probe paths
are routes the app serves. (InferenceService is a CRD: no schema here to validate the whole object.)"""

from __future__ import annotations

import pytest
import yaml

from tests.deploy.conftest import REPO

kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (in the dev extra)")

EXAMPLE = REPO / "docs" / "kserve-inferenceservice.yaml"


@pytest.fixture(scope="module")
def isvc() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def test_pod_spec_is_valid_kubernetes(isvc):
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = isvc["spec"]["predictor"]
    spec = {"containers": predictor["containers"], "volumes": predictor.get("volumes", [])}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "trimvlm"}, "spec": spec}
    kv.validate(pod, kv.latest_version(), strict=True)


def test_port_probes_and_settings_are_the_service_s(isvc):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    [container] = isvc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"  # the name KServe routes to
    env = {e["name"]: e["value"] for e in container["env"]}
    port = container["ports"][0]["containerPort"]
    assert env["TRIMVLM_PORT"] == str(port)
    assert {k for k in env if k.startswith("TRIMVLM_")} <= {f"TRIMVLM_{n.upper()}" for n in Settings.model_fields}
    client = TestClient(create_app(Settings(_env_file=None, demo_page=False)))  # no lifespan: nothing loads
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] == port and client.get(get["path"]).status_code in (200, 503), probe  # served (503: loading)
