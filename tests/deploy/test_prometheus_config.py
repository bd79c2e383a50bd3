"""docker/prometheus: `promtool check config`, `promtool check rules`, the rules' unit tests
(`promtool test rules`), and every metric the rules read is one the service exports."""

from __future__ import annotations

import yaml

from tests.deploy.conftest import DOCKER, RULES, metric_names, recorded_names, require_tool, run

PROMTOOL_INSTALL = "apt-get install -y prometheus (Debian) provides promtool"


def test_promtool_check_config():
    promtool = require_tool("promtool", PROMTOOL_INSTALL)
    res = run([promtool, "check", "config", "prometheus.yml"], cwd=DOCKER / "prometheus")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr


def test_promtool_check_rules():
    promtool = require_tool("promtool", PROMTOOL_INSTALL)
    res = run([promtool, "check", "rules", str(RULES)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_rule_unit_tests():
    """Synthetic series: p99 / error / batch recording rules give the expected numbers and each
    alert fires (and only) where it should."""
    promtool = require_tool("promtool", PROMTOOL_INSTALL)
    res = run([promtool, "test", "rules", "rules_test.yml"], cwd=DOCKER / "prometheus")
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_has_a_unit_test():
    rules = yaml.safe_load(RULES.read_text())
    tests = yaml.safe_load((DOCKER / "prometheus" / "rules_test.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tested = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert alerts == tested


def test_rules_read_only_exported_metrics(exported):
    rules = yaml.safe_load(RULES.read_text())
    known = exported | recorded_names(rules) | {"up"}
    for group in rules["groups"]:
        for rule in group["rules"]:
            unknown = metric_names(rule["expr"]) - known
            assert not unknown, f"{rule.get('record') or rule.get('alert')} reads {unknown}, which the service does not export"


def test_required_recording_rules():
    rules = yaml.safe_load(RULES.read_text())
    recorded = recorded_names(rules)
    for q in ("p50", "p95", "p99"):
        assert f"vlm:request_duration_seconds:{q}_5m" in recorded
    assert "vlm:batch_size:mean_5m" in recorded
    exprs = {r["record"]: r["expr"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    assert "by (le, endpoint)" in exprs["vlm:request_duration_seconds:p99_5m"], "p99 per endpoint"
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {"TrimVLMHighP99Latency", "TrimVLMHighErrorRate", "TrimVLMQueueSaturated", "TrimVLMModelNotReady"} <= alerts


def test_scrape_config_targets_the_service():
    cfg = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "trimvlm"]
    assert job["metrics_path"] == "/metrics"
    names = [n for sd in job["dns_sd_configs"] for n in sd["names"]]
    assert "trimvlm" in names and "trimvlm-gpu" in names
    assert all(sd["port"] == 8000 for sd in job["dns_sd_configs"])
    assert cfg["rule_files"] == ["rules.yml"]
