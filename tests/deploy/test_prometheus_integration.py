"""What `docker compose up` runs, as local processes on loopback: the service (`trimvlm serve`
on the embedded default model) and a real Prometheus scraping it every second with
docker/prometheus/rules.yml loaded. After some traffic, Prometheus's HTTP API must return the
p99 recording-rule series per endpoint with plausible values, every rule must evaluate cleanly,
and every Grafana panel query must return data (only event-driven series may be empty)."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import DASHBOARD, REPO, RULES, dashboard_targets, find_tool, metric_names, substitute_grafana

httpx = pytest.importorskip("httpx")
PIL = pytest.importorskip("PIL")
from PIL import Image, ImageDraw  # noqa: E402

pytestmark = pytest.mark.slow

ENDPOINTS = ("vqa", "caption", "retrieval")
# Series that exist only after a rare event (a full queue, a client leaving mid-request); the
# traffic below does not provoke them, so their panels may be empty (they show 0 in Grafana).
EVENT_ONLY = {"vlm_rejections_total", "vlm_cancelled_items_total"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_b64(shape: str, color: str, seed: int) -> str:
    rng = random.Random(seed)
    im = Image.new("RGB", (64, 64), "white")
    d = ImageDraw.Draw(im)
    x, y, r = rng.randint(18, 46), rng.randint(18, 46), rng.randint(8, 16)
    if shape == "circle":
        d.ellipse((x - r, y - r, x + r, y + r), fill=color)
    elif shape == "rectangle":
        d.rectangle((x - r, y - r, x + r, y + r), fill=color)
    else:
        d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=color)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    pytest.fail(f"{what} not ready at {url} after {timeout:.0f}s:\n{tail(log)}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def trimvlm_command() -> list[str]:
    script = Path(sys.executable).parent / "trimvlm"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from service.entrypoint import main; main()"]


class Prom:
    def __init__(self, base: str):
        self.base = base

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.base}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr!r}: {body}"
        return body["data"]["result"]

    def get(self, path: str, **params) -> dict:
        body = httpx.get(f"{self.base}{path}", params=params, timeout=10).json()
        assert body["status"] == "success", body
        return body["data"]


def send_traffic(base: str) -> dict[str, list[int]]:
    """A few dozen requests over several scrape intervals (rates need increases between
    scrapes), a few concurrent (so batches form), plus a bad request and an impossible deadline."""
    kinds = [(shape, color) for shape in ("circle", "rectangle", "triangle") for color in ("red", "blue")]
    images = [png_b64(shape, color, seed) for seed, (shape, color) in enumerate(kinds)]
    codes: dict[str, list[int]] = {e: [] for e in ("vqa", "caption", "retrieval", "bad", "deadline")}
    computes = ["auto", "fast", "balanced"]
    with httpx.Client(base_url=base, timeout=30) as client, ThreadPoolExecutor(4) as pool:

        def vqa(i: int) -> int:
            body = {"image": images[i % len(images)], "question": "what shape is this?", "compute": computes[i % 3]}
            return client.post("/vqa", json=body).status_code

        for rnd in range(10):
            codes["vqa"] += list(pool.map(vqa, range(rnd * 4, rnd * 4 + 4)))
            img = images[rnd % len(images)]
            codes["caption"].append(client.post("/caption", json={"image": img, "max_length": 8}).status_code)
            rank = {"image": img, "texts": ["a red circle", "a blue rectangle", "a red triangle"]}
            codes["retrieval"].append(client.post("/retrieval/rank", json=rank).status_code)
            if rnd % 3 == 0:  # repeated: a counter must rise between scrapes for rate() to see it
                bad = {"image": "not base64!", "question": "what shape is this?"}
                codes["bad"].append(client.post("/vqa", json=bad).status_code)
                late = {"image": img, "question": "what shape is this?", "deadline_ms": 0.01}
                codes["deadline"].append(client.post("/vqa", json=late).status_code)
            time.sleep(0.6)
    return codes


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    prometheus = find_tool("prometheus")
    if prometheus is None:
        pytest.skip("the prometheus binary is not installed (apt-get install -y prometheus)")
    tmp = tmp_path_factory.mktemp("compose-stack")
    svc_port, prom_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIMVLM_")}
    env.update(
        TRIMVLM_HOST="127.0.0.1",
        TRIMVLM_PORT=str(svc_port),
        TRIMVLM_MODELS_DIR=str(REPO / "models"),
        TRIMVLM_GALLERY_DIR=str(tmp / "gallery"),
        TRIMVLM_LOG_JSON="false",
        TRIMVLM_LOG_LEVEL="warning",
        TRIMVLM_INTRA_OP_THREADS="1",  # two shared cores here
        TRIMVLM_PREPROCESS_THREADS="2",
        TRIMVLM_INFERENCE_THREADS="1",
        PYTHONPATH=str(REPO),
    )
    svc_log = tmp / "service.log"
    svc = subprocess.Popen([*trimvlm_command(), "serve"], cwd=tmp, env=env, stdout=svc_log.open("w"), stderr=subprocess.STDOUT)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "trimvlm", "static_configs": [{"targets": [f"127.0.0.1:{svc_port}"]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom_log = tmp / "prometheus.log"
    prom = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--log.level=warn",
        ],
        cwd=tmp,
        stdout=prom_log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{svc_port}"
        wait_for(f"{base}/readyz", svc, svc_log, 180, "trimvlm serve")
        wait_for(f"http://127.0.0.1:{prom_port}/-/ready", prom, prom_log, 60, "prometheus")
        time.sleep(2)  # a couple of scrapes before the traffic: counters then rise between samples
        codes = send_traffic(base)
        api = Prom(f"http://127.0.0.1:{prom_port}")
        # scrapes after the traffic, then a rule evaluation
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = {s["metric"].get("endpoint") for s in api.query("vlm:request_duration_seconds:p99_5m")}
            if set(ENDPOINTS) <= got:
                break
            time.sleep(0.5)
        time.sleep(2)
        yield {"codes": codes, "api": api, "svc_log": svc_log, "prom_log": prom_log}
    finally:
        stop(prom)
        stop(svc)


def test_traffic_was_served(stack):
    codes = stack["codes"]
    for endpoint in ENDPOINTS:
        assert codes[endpoint] and set(codes[endpoint]) == {200}, (endpoint, codes[endpoint], tail(stack["svc_log"]))
    assert len(codes["vqa"]) >= 36
    assert set(codes["bad"]) <= {400, 422} and set(codes["deadline"]) <= {503, 504}


def test_target_is_up_and_model_ready(stack):
    api = stack["api"]
    (up,) = api.query('up{job="trimvlm"}')
    assert up["value"][1] == "1"
    ready = api.query("vlm_model_ready")
    assert ready and all(s["value"][1] == "1" for s in ready)


@pytest.mark.parametrize("quantile", ["p50", "p95", "p99"])
def test_latency_recording_rules_per_endpoint(stack, quantile):
    series = stack["api"].query(f"vlm:request_duration_seconds:{quantile}_5m")
    values = {s["metric"]["endpoint"]: float(s["value"][1]) for s in series}
    assert set(ENDPOINTS) <= set(values), f"{quantile} series per endpoint: {values}\n{tail(stack['prom_log'])}"
    for endpoint, v in values.items():
        assert math.isfinite(v) and 0 < v < 10, f"{quantile} of {endpoint} = {v}"


def test_p99_is_the_tail(stack):
    api = stack["api"]
    q = {
        name: {s["metric"]["endpoint"]: float(s["value"][1]) for s in api.query(f"vlm:request_duration_seconds:{name}_5m")}
        for name in ("p50", "p95", "p99")
    }
    for endpoint in ENDPOINTS:
        assert q["p50"][endpoint] <= q["p95"][endpoint] <= q["p99"][endpoint]


def test_other_recording_rules(stack):
    api = stack["api"]
    batch = api.query("vlm:batch_size:mean_5m")
    # Each series' rate() is extrapolated to the window edges on its own (towards zero from its first
    # sample), so when warm-up batches (before the first scrape) and traffic batches differ in size,
    # rate(sum) / rate(count) strays from the true mean by the difference in extrapolation (a loaded
    # CI run failed the exact bounds [1, 32]). Bounds: the batch sizes 1..32, give or take half.
    values = {s["metric"]["component"]: s["value"][1] for s in batch}
    assert batch and all(0.5 <= float(v) <= 48 for v in values.values() if v != "NaN"), values
    errors = {s["metric"]["endpoint"]: float(s["value"][1]) for s in api.query("vlm:request_errors:ratio_5m")}
    assert 0 < errors["vqa"] < 0.25, "a few 5xx (impossible deadlines) among ~50 /vqa requests"
    assert errors["caption"] == 0
    assert api.query("vlm:request_queue_duration_seconds:mean_5m")


def test_every_rule_evaluates_cleanly(stack):
    groups = stack["api"].get("/api/v1/rules")["groups"]
    expected = yaml.safe_load(RULES.read_text())
    assert len([r for g in groups for r in g["rules"]]) == sum(len(g["rules"]) for g in expected["groups"])
    bad = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
    assert not bad, bad
    firing = {a["labels"]["alertname"] for a in stack["api"].get("/api/v1/alerts")["alerts"]}
    assert not firing & {"TrimVLMDown", "TrimVLMModelNotReady", "TrimVLMRequestsRejected", "TrimVLMQueueSaturated"}, firing


def test_every_dashboard_query_returns_data(stack):
    """Run each Grafana panel's PromQL against the live Prometheus: valid, and non-empty unless
    it reads only event-driven series."""
    api = stack["api"]
    dashboard = json.loads(DASHBOARD.read_text())
    empty = []
    for title, expr in dashboard_targets(dashboard):
        result = api.query(substitute_grafana(expr))
        if not result and not metric_names(expr) <= EVENT_ONLY:
            empty.append((title, expr))
    assert not empty, f"panels with no data after traffic: {empty}"
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            metric, label = var["definition"].removeprefix("label_values(").rstrip(")").split(", ")
            values = api.get(f"/api/v1/label/{label}/values", **{"match[]": metric})
            assert values, f"variable {var['name']} has no values"
