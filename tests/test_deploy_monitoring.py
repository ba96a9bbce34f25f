"""Prometheus configuration and alert rules checked by promtool (config, rules, and the rules'
unit tests in deploy/prometheus/alerts_test.yml), and the Grafana dashboard and provisioning
read for what Grafana needs. Whether the expressions return data from a real server is
tests/test_deploy_live.py's job.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from deploy_tools import (
    ALERTS,
    DEPLOY,
    all_expressions,
    dashboard,
    dashboard_panels,
    run,
    tool,
    yaml_document,
)

PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
ON_CALL_ALERTS = {
    "ImgserveDown", "ImgserveAbsent", "ImgserveHighErrorRatio", "ImgserveHighLatencyP99",
    "ImgserveQueueTimeHigh", "ImgserveQueueBacklog", "ImgserveRequestsDropped",
    "ImgserveModelNotReady", "ImgserveGpuMemoryNearlyFull", "ImgserveAuthRejections",
    "ImgserveWorkersRestarting",
}  # fmt: skip


def promtool(*args: str) -> str:
    result = run([tool("promtool"), *args], cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_promtool_accepts_the_compose_config_and_its_rules() -> None:
    out = promtool("check", "config", "prometheus.yml")
    assert "SUCCESS: 1 rule files found" in out
    config = yaml_document(PROMETHEUS / "prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "imgserve"  # what the rules and the dashboard select
    assert job["static_configs"] == [{"targets": ["server:8002"]}]  # the compose service


def test_promtool_accepts_the_alert_rules() -> None:
    out = promtool("check", "rules", ALERTS.name)
    assert f"SUCCESS: {len(ON_CALL_ALERTS)} rules found" in out


def test_alert_rules_unit_tests_pass() -> None:
    """promtool feeds synthetic series to the rules: each alert fires when it should (with the
    labels and text on-call reads) and the healthy series next to it do not."""
    out = promtool("test", "rules", "alerts_test.yml")
    assert "SUCCESS" in out
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts_test.yml").read_text()))
    assert tested == ON_CALL_ALERTS


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    """Guards the tests above against a promtool that accepts anything."""
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n- name: x\n  rules:\n  - alert: X\n    expr: rate(up[5m]\n")
    result = run([tool("promtool"), "check", "rules", str(broken)])
    assert result.returncode != 0


def test_every_alert_says_what_and_how_bad() -> None:
    rules = [rule for group in yaml_document(ALERTS)["groups"] for rule in group["rules"]]
    assert {rule["alert"] for rule in rules} == ON_CALL_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert "for" in rule, f"{rule['alert']}: fires on a single evaluation"


def test_dashboard_is_valid_grafana_json() -> None:
    board = dashboard()
    assert board["uid"] == "imgserve-overview"  # stable: links and provisioning use it
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard_panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip()
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}"


def rectangles_overlap(a: dict[str, int], b: dict[str, int]) -> bool:
    return (
        a["x"] < b["x"] + b["w"]
        and b["x"] < a["x"] + a["w"]
        and a["y"] < b["y"] + b["h"]
        and b["y"] < a["y"] + a["h"]
    )


def test_dashboard_panels_fit_the_grid_without_overlapping() -> None:
    panels = dashboard()["panels"]
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
    for i, a in enumerate(panels):
        for b in panels[i + 1 :]:
            assert not rectangles_overlap(a["gridPos"], b["gridPos"]), (a["title"], b["title"])


@pytest.mark.parametrize(
    "needle",
    [
        "imgserve_requests_total",  # throughput by model, errors by code
        "histogram_quantile(0.5,",  # p50 / p95 / p99 latency
        "histogram_quantile(0.95,",
        "histogram_quantile(0.99, sum by (le, model) (rate(imgserve_request_duration_seconds",
        "imgserve_queue_duration_seconds",  # queue vs compute time
        "imgserve_compute_duration_seconds",
        "imgserve_batch_size_bucket",  # batch size distribution
        "imgserve_queue_depth",
        "imgserve_inflight_requests",
        'code!="OK"',
        "imgserve_model_ready",
        "imgserve_gpu_utilization_ratio",
        "imgserve_gpu_memory_used_bytes",
        "sum by (model, reason) (rate(imgserve_requests_dropped_total",
        "sum by (code) (rate(imgserve_auth_rejections_total",
    ],
)
def test_dashboard_shows_what_on_call_needs(needle: str) -> None:
    exprs = " ".join(t["expr"] for panel in dashboard_panels() for t in panel["targets"])
    assert needle in exprs


def test_mean_batch_size_is_the_batch_size_histograms_mean() -> None:
    """inferences_total counts the images of successful batches only while batches_total
    counts failed batches too, so their ratio sinks when batches fail; the batch-size
    histogram observes every formed batch once."""
    (panel,) = [p for p in dashboard_panels() if p["title"] == "Mean batch size"]
    (target,) = panel["targets"]
    numerator, denominator = target["expr"].split(" / ")
    assert numerator.startswith("sum by (model) (rate(imgserve_batch_size_sum{")
    assert denominator.startswith("sum by (model) (rate(imgserve_batch_size_count{")


def test_absent_and_backlog_alerts_hold_with_any_number_of_replicas() -> None:
    rules = {r["alert"]: r for g in yaml_document(ALERTS)["groups"] for r in g["rules"]}
    assert 'count(up{job="imgserve"} == 1) or vector(0)' in rules["ImgserveAbsent"]["expr"]
    assert rules["ImgserveQueueBacklog"]["expr"].startswith(
        "max by (model, instance) (imgserve_queue_depth)"
    )


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    (source,) = yaml_document(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    compose: dict[str, Any] = yaml_document(DEPLOY / "docker-compose.yml")
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    (provider,) = yaml_document(GRAFANA / "provisioning" / "dashboards" / "imgserve.yml")[
        "providers"
    ]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_expressions_are_collected_from_rules_dashboard_and_adapter() -> None:
    wheres = [e.where for e in all_expressions()]
    assert sum(w.startswith("alert ") for w in wheres) == len(ON_CALL_ALERTS)
    assert sum(w.startswith("panel ") for w in wheres) >= 15
    assert any(w.startswith("prometheus-adapter ") for w in wheres)
    for expression in all_expressions():
        assert "$" not in expression.promql and "<<" not in expression.promql, expression


def test_dashboard_leads_from_slow_latency_buckets_to_their_traces() -> None:
    """Exemplars (server tracing on) on the request and queue latency panels, the datasource
    linking their `trace_id` (the label the server's exemplars carry) to a trace UI, and a
    compose Prometheus that stores exemplars."""
    exprs = " ".join(
        target["expr"]
        for panel in dashboard_panels()
        for target in panel["targets"]
        if target.get("exemplar")
    )
    assert "imgserve_request_duration_seconds_bucket" in exprs
    assert "imgserve_queue_duration_seconds_bucket" in exprs
    (source,) = yaml_document(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")[
        "datasources"
    ]
    (destination,) = source["jsonData"]["exemplarTraceIdDestinations"]
    assert destination["name"] == "trace_id"
    assert destination["url"].endswith("$${__value.raw}")  # `$$`: a literal `$` to Grafana
    compose: dict[str, Any] = yaml_document(DEPLOY / "docker-compose.yml")
    assert "--enable-feature=exemplar-storage" in compose["services"]["prometheus"]["command"]
    assert "IMGSERVE_TRACE_URL" in compose["services"]["grafana"]["environment"]
