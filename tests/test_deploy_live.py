"""The monitoring and the container health check against a real server.

A real Prometheus (Debian's `prometheus`) scrapes a real server every second while it serves
a few hundred requests, some of them bad, and then every PromQL expression of the alert
rules, the dashboard and the autoscaling example must return data. The only exception is the
GPU expressions: without a GPU the server declares the GPU metrics (HELP/TYPE) but has no
samples for them, so those are checked for their declaration instead.

Alert rules compare one expression with a threshold (`EXPR > 0.5`). On a healthy server the
comparison filters everything out, so the test evaluates EXPR, the part before the comparison
(deploy_tools.alert_expressions); the thresholds themselves are tested by promtool's rule
unit tests (tests/test_deploy_monitoring.py).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml
from deploy_tools import (
    ALERTS,
    GPU_METRICS,
    Expression,
    all_expressions,
    dashboard_label_queries,
    run,
    tool,
)
from pki import make_pki
from prometheus_client.parser import text_string_to_metric_families
from server_process import ServerProcess
from tritonclient.utils import InferenceServerException

from server.healthcheck import default_address

MODELS = ("fashion_mnist", "cifar10")
SHAPES = {"fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
EXPRESSIONS = all_expressions()
# Token authentication on, so that the auth rejection series exists: the load carries this
# token, and one call per round goes without it.
TOKEN = "live-monitoring-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    # Two workers: the monitoring must work on the aggregated metrics of several processes.
    return serve("--workers", "2", models=list(MODELS), env={"SERVER_AUTH_TOKENS": TOKEN})


class Prometheus:
    """A real Prometheus on 127.0.0.1, storing into a temporary folder, in its own process
    group so that stop() ends it and anything it started."""

    def __init__(
        self, binary: str, workdir: Path, metrics_target: str, flags: Sequence[str] = ()
    ) -> None:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {"job_name": "imgserve", "static_configs": [{"targets": [metrics_target]}]}
            ],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.storage = workdir / "data"
        self.log = workdir / "prometheus.log"
        self.binary = binary
        self.flags = tuple(flags)  # more command-line flags (e.g. --enable-feature=...)
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        with socket.socket() as sock:  # a free port; Prometheus cannot report one it picked
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.storage}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                    *self.flags,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_until(lambda: self._get("/-/ready") is not None, "ready", timeout)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def _get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return response.read()
        except (urllib.error.URLError, ConnectionError):
            return None

    def api(self, path: str, **params: str) -> Any:
        body = self._get(f"/api/v1/{path}?{urllib.parse.urlencode(params)}")
        assert body is not None, f"Prometheus did not answer /api/v1/{path}:\n{self.log_text}"
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        return data["result"]

    def wait_until(self, done: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            exited = self.process is not None and self.process.poll() is not None
            if exited or time.monotonic() > deadline:
                raise AssertionError(f"Prometheus: not {what} in {timeout}s:\n{self.log_text}")
            time.sleep(0.2)

    @property
    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def send_load(target: str, rounds: int) -> int:
    """Good requests of 1 and 8 images on both models, plus a few bad ones (wrong shape,
    unknown model) so that error series exist and one without a token so that the auth
    rejection series does; returns how many inference requests were answered (the refused
    call never reaches inference)."""
    client = triton.InferenceServerClient(target)
    answered = 0
    try:
        for i in range(rounds):
            model = MODELS[i % 7 == 0]  # mostly fashion_mnist, some cifar10
            batch = 8 if i % 5 == 0 else 1
            images = np.random.rand(batch, *SHAPES[model]).astype(np.float32)
            inp = triton.InferInput("input", list(images.shape), "FP32")
            inp.set_data_from_numpy(images)
            client.infer(model, [inp], headers=AUTH)
            answered += 1
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            client.infer(model, [inp])
        for model, shape in (("fashion_mnist", (1, 1, 27, 27)), ("no_such_model", (1, 1, 28, 28))):
            inp = triton.InferInput("input", list(shape), "FP32")
            inp.set_data_from_numpy(np.zeros(shape, np.float32))
            for _ in range(2):
                with pytest.raises(InferenceServerException):
                    client.infer(model, [inp], headers=AUTH)
                answered += 1
    finally:
        client.close()
    return answered


@pytest.fixture(scope="module")
def prometheus(
    server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    binary = tool("prometheus")
    instance = Prometheus(
        binary, tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{server.metrics_port}"
    )
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def scraped(server: ServerProcess, prometheus: Prometheus) -> Prometheus:
    """Prometheus after it has scraped the server before, between and after two rounds of
    load: every counter it holds has grown inside the queried windows, so rates are real."""

    def total_requests() -> float:
        result = prometheus.query("sum(imgserve_requests_total)")
        return float(result[0]["value"][1]) if result else 0.0

    prometheus.wait_until(lambda: bool(prometheus.query('up{job="imgserve"} == 1')), "up", 30)
    sent = 0
    for _ in range(2):
        sent += send_load(server.target, rounds=150)
        prometheus.wait_until(lambda goal=sent: total_requests() >= goal, f"at {sent} requests", 30)
    return prometheus


def finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


@pytest.mark.parametrize("expression", EXPRESSIONS, ids=[e.where for e in EXPRESSIONS])
def test_expression_returns_data_from_a_live_server(
    scraped: Prometheus, expression: Expression
) -> None:
    result = scraped.query(expression.promql)
    if expression.needs_gpu and not result:
        # The one exception: without a GPU (or without NVML) the server has no GPU samples.
        # test_gpu_metrics_are_declared_without_a_gpu checks that the names these expressions
        # use are declared on /metrics, so they return data on a server that has a GPU.
        names = ", ".join(sorted(expression.metric_names))
        pytest.skip(
            f"no GPU samples on this machine (no GPU or no NVML), so no data for {names}; "
            "their declaration on /metrics is checked instead"
        )
    assert result, f"{expression.where}: no data for\n{expression.promql}"
    assert finite(result), f"{expression.where}: only NaN/Inf for\n{expression.promql}: {result}"


def test_dashboard_variables_list_the_served_models_and_servers(scraped: Prometheus) -> None:
    for variable, selector, label in dashboard_label_queries():
        values = scraped.api(f"label/{label}/values", **{"match[]": selector})
        assert values, f"dashboard variable {variable}: no {label} values for {selector}"
        if label == "model":
            assert set(MODELS) <= set(values)


def test_prometheus_loads_and_evaluates_every_alert_rule(scraped: Prometheus) -> None:
    def rules() -> list[dict[str, Any]]:
        return [r for group in scraped.api("rules")["groups"] for r in group["rules"]]

    scraped.wait_until(
        lambda: all(rule["health"] != "unknown" for rule in rules()), "done evaluating", 15
    )
    for rule in rules():
        assert rule["health"] == "ok", rule
        assert rule["state"] != "firing", rule  # a healthy server, and every rule has `for:`
    assert len(rules()) == len([e for e in EXPRESSIONS if e.where.startswith("alert ")])


@pytest.fixture(scope="module")
def declared(server: ServerProcess) -> set[str]:
    """Every series name the server's /metrics declares, after some load (no Prometheus
    needed: this check runs where the Prometheus binary is missing too)."""
    send_load(server.target, rounds=20)
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",)}
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
    return names


def test_every_metric_used_by_a_panel_or_rule_exists(declared: set[str]) -> None:
    """No dead panels: each imgserve_* name in the rules, the dashboard and the autoscaling
    example is on a live /metrics page."""
    used = set().union(*(e.metric_names for e in EXPRESSIONS))
    assert len(used) >= 10, used
    assert used <= declared, f"not exported by the server: {sorted(used - declared)}"


def test_gpu_metrics_are_declared_without_a_gpu(declared: set[str]) -> None:
    assert declared >= GPU_METRICS


def healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The check as the image runs it: in a process of its own, with the server's settings
    (SERVER_*) in its environment, and none but `env`'s."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SERVER_")}
    command = [sys.executable, "-m", "server.healthcheck", *args]
    return run(command, timeout=30, env={**base, **(env or {})})


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("0.0.0.0", "localhost:9001"),
        ("::", "localhost:9001"),
        ("", "localhost:9001"),
        ("10.1.2.3", "10.1.2.3:9001"),
        ("fd00::7", "[fd00::7]:9001"),
    ],
)
def test_healthcheck_dials_the_address_the_server_binds(host: str, address: str) -> None:
    env = {"SERVER_HOST": host, "SERVER_GRPC_PORT": "9001"}
    assert default_address(env) == address
    assert default_address({}) == "localhost:8001"


def test_container_healthcheck_reads_the_servers_settings(server: ServerProcess) -> None:
    """No flags, as in the image's HEALTHCHECK: SERVER_HOST and SERVER_GRPC_PORT say where."""
    env = {"SERVER_HOST": server.host, "SERVER_GRPC_PORT": str(server.grpc_port)}
    ok = healthcheck(env=env)
    assert ok.returncode == 0 and f"{server.target} service '': SERVING" in ok.stdout, (
        ok.stdout + ok.stderr
    )


def test_container_healthcheck_asks_grpc_health(server: ServerProcess) -> None:
    """The image's HEALTHCHECK command, against the real server."""
    ok = healthcheck("--address", server.target)
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
    model = healthcheck("--address", server.target, "--service", "cifar10")
    assert model.returncode == 0, model.stdout
    unknown = healthcheck("--address", server.target, "--service", "no_such_model")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stdout, unknown.stdout


def test_container_healthcheck_fails_without_a_server() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    down = healthcheck("--address", f"127.0.0.1:{port}", "--timeout", "1")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stdout, down.stdout + down.stderr


def test_container_healthcheck_speaks_mutual_tls(
    serve: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """A server that requires client certificates: the check needs the CA and a client
    certificate, and fails without them rather than reporting a healthy server."""
    pki = make_pki(tmp_path)
    mtls = serve(*pki.server_args(), "--tls-client-ca", str(pki.ca), models=["fashion_mnist"])
    address = ("--address", mtls.target, "--timeout", "2")
    client = ("--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))
    ok = healthcheck(*address, "--tls-ca", str(pki.ca), *client)
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
    for args in ((), ("--tls-ca", str(pki.ca))):
        refused = healthcheck(*address, *args)
        assert refused.returncode == 1 and "UNAVAILABLE" in refused.stdout, refused.stdout
    usage = healthcheck(*address, *client)
    assert usage.returncode == 2 and "--tls-ca" in usage.stderr
    # The certificate names localhost and 127.0.0.1: another name is refused.
    ca = ("--tls-ca", str(pki.ca), *client)
    named = healthcheck(*address, *ca, "--tls-server-name", "localhost")
    assert named.returncode == 0, named.stdout + named.stderr
    misnamed = healthcheck(*address, *ca, "--tls-server-name", "imgserve.example")
    assert misnamed.returncode == 1 and "UNAVAILABLE" in misnamed.stdout, misnamed.stdout

    # With no flags, from the environment the image's HEALTHCHECK runs in: the server's own
    # TLS settings say TLS is on, the SERVER_HEALTHCHECK_TLS_* files say how to connect.
    settings = {
        "SERVER_HOST": mtls.host,
        "SERVER_GRPC_PORT": str(mtls.grpc_port),
        "SERVER_TLS_CERT": str(pki.server_cert),
        "SERVER_TLS_KEY": str(pki.server_key),
        "SERVER_TLS_CLIENT_CA": str(pki.ca),
    }
    files = {
        "SERVER_HEALTHCHECK_TLS_CA": str(pki.ca),
        "SERVER_HEALTHCHECK_TLS_CERT": str(pki.client_cert),
        "SERVER_HEALTHCHECK_TLS_KEY": str(pki.client_key),
    }
    ok = healthcheck("--timeout", "2", env={**settings, **files})
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
    no_ca = healthcheck("--timeout", "2", env=settings)
    assert no_ca.returncode == 1 and "SERVER_HEALTHCHECK_TLS_CA" in no_ca.stderr, no_ca.stderr
    only_ca = {**settings, "SERVER_HEALTHCHECK_TLS_CA": str(pki.ca)}
    no_cert = healthcheck("--timeout", "2", env=only_ca)
    assert no_cert.returncode == 1 and "SERVER_HEALTHCHECK_TLS_CERT" in no_cert.stderr
