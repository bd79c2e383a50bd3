"""Shared helpers for the deployment checks (docker/, helm/): where the validators are, the
metric names the service really exports, and how to pull metric names out of PromQL."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
CHART = REPO / "helm" / "trimvlm"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "trimvlm.json"
RULES = DOCKER / "prometheus" / "rules.yml"

# Grafana's variables, replaced by what "All" / the defaults give before PromQL is parsed
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$endpoint": ".*",
    "$instance": ".*",
}


def find_tool(name: str) -> str | None:
    """A command-line tool from the virtualenv running pytest (pip-installed validators such as
    hadolint and docker-compose live there, and CI runs .venv/bin/pytest without activating it)
    or from PATH."""
    venv_bin = Path(sys.executable).parent / name
    if venv_bin.is_file():
        return str(venv_bin)
    return shutil.which(name)


def require_tool(name: str, install: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({install})")
    return path


def run(cmd: list[str], cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def exported_metric_names() -> set[str]:
    """Every sample name service/metrics.py can export, from a live Metrics() registry: the
    family names from registry.collect() with the suffixes prometheus-client adds per type."""
    from service.metrics import Metrics

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
        "stateset": ("",),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "unknown": ("",),
    }
    names = set()
    for family in Metrics().registry.collect():
        names.update(family.name + s for s in suffixes[family.type])
    return names


def recorded_names(rules_doc: dict) -> set[str]:
    return {r["record"] for g in rules_doc["groups"] for r in g["rules"] if "record" in r}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (Grafana variables substituted first)."""
    promql_parser = pytest.importorskip("promql_parser", reason="promql-parser is not installed (the dev extra has it)")
    expr = substitute_grafana(expr)
    leftover = re.findall(r"\$\w+", expr)
    assert not leftover, f"unknown Grafana variables {leftover} in {expr!r}"
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def substitute_grafana(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    return expr


def dashboard_targets(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, rows included."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((p.get("title", "?"), t.get("expr", "")))
            walk(p.get("panels", []))

    walk(dashboard["panels"])
    return out


@pytest.fixture(scope="session")
def exported() -> set[str]:
    return exported_metric_names()
