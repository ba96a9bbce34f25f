"""The real images, built from the Dockerfile and run on a real Docker engine.

- The trainer image, run with the Kubernetes build Job's container settings, builds a model
  repository into a named volume; the servers below serve that volume.
- The server image, run as the README runs it (read-only root filesystem, /tmp in memory, the
  repository read-only): it runs as a non-root user, becomes healthy by its own HEALTHCHECK,
  answers tritonclient (gRPC, and HTTP on its HTTP port) with the reference outputs the export
  wrote, serves /metrics, and on
  `docker stop` (Docker's default timeout) finishes with exit code 0 while answering requests.
  Its size is reported and kept down.
- The server image run with the Deployment's container settings (user and group, read-only
  root, no capabilities, no privilege escalation, the ConfigMap's environment, its ports,
  memory and CPU limits, the in-memory /tmp): the startup, readiness and liveness probes pass
  as the kubelet sends them, and the init container finds the models (and waits without them).
- `docker compose up` of deploy/docker-compose.yml: the trainer trains into the stack's volume,
  the server then serves it, and Prometheus scrapes the server container (`up == 1`) and
  evaluates the alert rules on its data. Grafana is left out: it has no Debian package, so no
  image of it can be stood in where no registry answers (CI); its dashboard's queries are
  evaluated against a live Prometheus in tests/test_deploy_live.py.

Needs a Docker engine and a client that builds with BuildKit (deploy_tools.docker_engine). On
the CI machine `make test` runs deploy/ci/prepare-docker.sh, which starts one and stands in the
base images no registry serves there. Without an engine every test here skips, saying why;
under CI they fail instead.

Each image is built once per run under a tag of its own, from the compose stack's build
settings (context, Dockerfile, target), and untagged at the end: BuildKit's cache keeps the
layers, so the next run builds in seconds. Containers, volumes and networks carry the run's
name and are removed when their tests end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as httpclient
from deploy_tools import (
    DEPLOY,
    ROOT,
    Docker,
    DockerError,
    alert_expressions,
    docker_engine,
    run,
    tool,
    yaml_document,
    yaml_documents,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from modelrepo.layout import (
    CONFIG_FILE,
    INPUT_NAME,
    LABELS_FILE,
    ONNX_FILE,
    OUTPUT_NAME,
    REFERENCE_FILE,
)

COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
MODELS = ("fashion_mnist", "cifar10")
SHAPES = {"fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
RUN = f"imgserve-test-{uuid.uuid4().hex[:8]}"
# `docker stop` sends SIGTERM, then SIGKILL after this many seconds unless told otherwise.
DOCKER_STOP_TIMEOUT_S = 10
# The server user of the Dockerfile and the manifests.
USER = "10001"
# What the server image may add to its base (venv, code): 186 MB when this was written.
SERVER_LAYERS_LIMIT_MB = 230
# The stack needs a Grafana password to parse, though Grafana is not started here.
COMPOSE_ENV = {**os.environ, "GRAFANA_ADMIN_PASSWORD": "compose-test-password", "EPOCHS": "1"}
# Alert expressions that have no data in the compose stack, and why. The test checks that
# they have none, so that this list cannot hide one that stopped working.
NO_DATA_IN_THE_STACK = {
    "alert ImgserveGpuMemoryNearlyFull": "no GPU on a CPU-only machine",
}

# Builds, training and the compose stack take minutes on 2 cores; every docker command has
# its own timeout besides.
pytestmark = pytest.mark.timeout(1200)


MEASURED: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _print_measurements(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print what the tests measured (sizes, build and start times) at the end of the module,
    in the test run's output, whatever the capture setting."""
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if not MEASURED or reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        for line in MEASURED:
            reporter.write_line(f"[containers] {line}")
    MEASURED.clear()


@pytest.fixture(scope="module")
def docker() -> Docker:
    return docker_engine()


def compose(*args: str, files: list[Path], timeout: float = 60) -> Any:
    command = [tool("docker-compose"), "--progress", "quiet", "-p", RUN]
    for file in files:
        command += ["-f", str(file)]
    result = run([*command, *args], timeout=timeout, env=COMPOSE_ENV)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-3000:]
        raise DockerError(f"docker-compose {' '.join(args)} exited {result.returncode}:\n{output}")
    return result


@pytest.fixture(scope="module")
def compose_services() -> dict[str, Any]:
    rendered = compose("config", "--format", "json", files=[COMPOSE])
    return json.loads(rendered.stdout)["services"]


# --- images ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    tag: str
    size_mb: float
    build_s: float


def build(docker: Docker, service: dict[str, Any], tag: str) -> Iterator[Image]:
    """Build what a compose service's `build:` says, tagged `tag`; untag it afterwards."""
    settings = service["build"]
    context = Path(settings["context"])
    dockerfile = context / settings.get("dockerfile", "Dockerfile")
    start = time.monotonic()
    docker(
        "build", "--target", settings["target"], "--tag", tag, "--file", str(dockerfile),
        str(context), timeout=1200,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    size = docker.inspect("image", tag)["Size"] / 1e6
    MEASURED.append(f"{settings['target']} image: {size:.0f} MB, built in {elapsed:.0f} s")
    try:
        yield Image(tag, size, elapsed)
    finally:
        docker("image", "rm", tag, check=False)


@pytest.fixture(scope="module")
def server_image(docker: Docker, compose_services: dict[str, Any]) -> Iterator[Image]:
    yield from build(docker, compose_services["server"], f"{RUN}:server")


@pytest.fixture(scope="module")
def trainer_image(docker: Docker, compose_services: dict[str, Any]) -> Iterator[Image]:
    yield from build(docker, compose_services["trainer"], f"{RUN}:trainer")


# --- containers ------------------------------------------------------------------------------


@dataclass
class Container:
    docker: Docker
    name: str
    started: float = field(default_factory=time.monotonic)

    def state(self) -> dict[str, Any]:
        return self.docker.inspect(self.name)["State"]

    def logs(self) -> str:
        result = self.docker("logs", self.name, check=False)
        return (result.stdout + result.stderr)[-4000:]

    def address(self, port: int) -> str:
        """host:port where the container's TCP `port` is published."""
        published = self.docker("port", self.name, f"{port}/tcp").stdout.split()
        assert published, f"{self.name}: port {port} is not published"
        return published[0]

    def exec(self, *command: str, check: bool = True) -> str:
        result = self.docker("exec", self.name, *command, check=check)
        return result.stdout + result.stderr

    def wait_healthy(self, timeout: float) -> float:
        """Seconds from start until Docker's health status is `healthy`."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            assert state["Running"], f"{self.name} exited:\n{self.logs()}"
            if state.get("Health", {}).get("Status") == "healthy":
                return time.monotonic() - self.started
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: not healthy in {timeout:.0f} s: {state.get('Health')}\n"
                    f"{self.logs()}"
                )
            time.sleep(0.5)

    def remove(self) -> None:
        self.docker("rm", "--force", "--volumes", self.name, check=False, timeout=60)


@pytest.fixture(scope="module")
def volumes(docker: Docker) -> Iterator[Callable[[str], str]]:
    """Creates named volumes for the module (`volumes("models")`); removes them at the end."""
    made: list[str] = []

    def create(purpose: str) -> str:
        name = f"{RUN}-{purpose}-{len(made)}"
        docker("volume", "create", name)
        made.append(name)
        return name

    yield create
    for name in made:
        docker("volume", "rm", "--force", name, check=False)


def process_status(container: Container) -> dict[str, str]:
    """/proc/1/status of the container's main process, as a dict."""
    text = container.exec("cat", "/proc/1/status")
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def copy_out(container: Container, path: str, destination: Path) -> Path:
    container.docker("cp", f"{container.name}:{path}", str(destination))
    return destination


# --- Kubernetes container settings as `docker run` options -----------------------------------

_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi)?$")
_SCALE = {None: 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity(text: str | int) -> float:
    match = _QUANTITY.match(str(text))
    assert match, f"unsupported Kubernetes quantity {text!r}"
    return float(match[1]) * _SCALE[match[2]]


def kube_expand(text: str, env: dict[str, str]) -> str:
    """What Kubernetes does to command and args: `$(NAME)` becomes the variable, `$$` a `$`."""

    def replace(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        return env.get(match[1], match[0])

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", replace, text)


def config_map(name: str) -> dict[str, str]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml_documents(path):
            if doc.get("kind") == "ConfigMap" and doc["metadata"]["name"] == name:
                return {key: str(value) for key, value in doc["data"].items()}
    raise AssertionError(f"no ConfigMap {name} in {K8S}")


def kube_run_args(
    pod: dict[str, Any],
    container: dict[str, Any],
    claims: dict[str, str],
    scratch: Callable[[str], str],
) -> tuple[list[str], list[str]]:
    """(`docker run` options, command after the image) that give a container what the pod
    spec gives it: user, group, fsGroup, read-only root, capabilities, privilege escalation,
    environment (env and envFrom ConfigMaps), ports (published on loopback), memory and CPU
    limits, volumes (a PVC is the named volume `claims` maps it to; an in-memory emptyDir a
    tmpfs; any other emptyDir a new volume from `scratch`), command and args. seccomp's
    RuntimeDefault is Docker's default."""
    pod_security = pod.get("securityContext", {})
    security = {**pod_security, **container.get("securityContext", {})}
    options: list[str] = []
    if "runAsUser" in security:
        options += ["--user", f"{security['runAsUser']}:{security.get('runAsGroup', 0)}"]
    if "fsGroup" in pod_security:
        options += ["--group-add", str(pod_security["fsGroup"])]
    if security.get("readOnlyRootFilesystem"):
        options.append("--read-only")
    if security.get("allowPrivilegeEscalation") is False:
        options += ["--security-opt", "no-new-privileges"]
    for capability in security.get("capabilities", {}).get("drop", []):
        options += ["--cap-drop", capability]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_map(source["configMapRef"]["name"]))
    for variable in container.get("env", []):
        env[variable["name"]] = kube_expand(str(variable["value"]), env)
    for name, value in env.items():
        options += ["--env", f"{name}={value}"]
    for port in container.get("ports", []):
        options += ["--publish", f"127.0.0.1::{port['containerPort']}"]
    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        options += ["--memory", str(int(quantity(limits["memory"])))]
    if "cpu" in limits:
        options += ["--cpus", f"{quantity(limits['cpu']):g}"]
    pod_volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = pod_volumes[mount["name"]]
        path, read_only = mount["mountPath"], mount.get("readOnly", False)
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]
            source = claims[claim["claimName"]]
            read_only = read_only or claim.get("readOnly", False)
            options += ["--volume", f"{source}:{path}{':ro' if read_only else ''}"]
        elif volume.get("emptyDir", {}).get("medium") == "Memory":
            size = volume["emptyDir"].get("sizeLimit")
            tmpfs = f"{path}:rw,exec,nosuid,mode=1777"
            options += ["--tmpfs", tmpfs + (f",size={int(quantity(size))}" if size else "")]
        elif "emptyDir" in volume:
            options += ["--volume", f"{scratch(mount['name'])}:{path}"]
        else:
            raise AssertionError(f"volume {mount['name']}: no docker equivalent here: {volume}")
    command = [kube_expand(part, env) for part in container.get("command", [])]
    args = [kube_expand(part, env) for part in container.get("args", [])]
    if command:
        options += ["--entrypoint", command[0]]
        return options, [*command[1:], *args]
    return options, args


def manifest_pod(path: Path) -> dict[str, Any]:
    return yaml_document(path)["spec"]["template"]["spec"]


def only(containers: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [c for c in containers if c["name"] == name]
    return found


# --- the trainer, with the build Job's settings -------------------------------------------


@dataclass(frozen=True)
class TrainerRun:
    volume: str
    exit_code: int
    log: str
    seconds: float


@pytest.fixture(scope="module")
def trained(
    docker: Docker,
    trainer_image: Image,
    volumes: Callable[[str], str],
) -> TrainerRun:
    """The build Job's trainer container, run into a new volume standing in for its PVC."""
    pod = manifest_pod(K8S / "job-build-repository.yaml")
    container = only(pod["containers"], "trainer")
    models = volumes("models")
    options, command = kube_run_args(pod, container, {"imgserve-models": models}, volumes)
    name = f"{RUN}-trainer"
    start = time.monotonic()
    try:
        result = docker(
            "run", "--name", name, *options, trainer_image.tag, *command,
            timeout=900, check=False,
        )  # fmt: skip
    finally:
        docker("rm", "--force", "--volumes", name, check=False)
    elapsed = time.monotonic() - start
    MEASURED.append(f"trainer (build Job settings): exit {result.returncode} in {elapsed:.0f} s")
    return TrainerRun(models, result.returncode, result.stdout + result.stderr, elapsed)


@pytest.fixture(scope="module")
def repository(trained: TrainerRun) -> str:
    """The volume holding the trained repository; fails the caller if training failed."""
    if trained.exit_code != 0:
        pytest.fail(f"the trainer container exited {trained.exit_code}:\n{trained.log[-3000:]}")
    return trained.volume


def test_build_job_settings_build_a_repository_into_a_volume(
    trained: TrainerRun, docker: Docker, server_image: Image
) -> None:
    assert trained.exit_code == 0, trained.log[-3000:]
    assert f"model repository /models: built {list(MODELS)}" in trained.log, trained.log[-2000:]
    listing = docker(
        "run", "--rm", "--volume", f"{trained.volume}:/models:ro", "--entrypoint", "find",
        server_image.tag, "/models", "-printf", "%U:%G %P\\n",
    ).stdout.split("\n")  # fmt: skip
    owners = [line.split(" ", 1) for line in listing if " " in line]
    found = {path: owner for owner, path in owners}
    for model in MODELS:
        for path in (CONFIG_FILE, LABELS_FILE, f"1/{ONNX_FILE}", f"1/{REFERENCE_FILE}"):
            assert f"{model}/{path}" in found, f"{model}/{path} missing: {sorted(found)}"
    # Written by the Job's user, so a later build (or a rerun of the Job) can add to it.
    assert set(found.values()) == {f"{USER}:{USER}"}, found


# --- the server, as the README runs it ---------------------------------------------------------


@pytest.fixture(scope="module")
def server(docker: Docker, server_image: Image, repository: str) -> Iterator[Container]:
    container = Container(docker, f"{RUN}-server")
    docker(
        "run", "--detach", "--name", container.name, "--read-only", "--tmpfs", "/tmp",
        "--volume", f"{repository}:/models:ro",
        "--publish", "127.0.0.1::8000", "--publish", "127.0.0.1::8001",
        "--publish", "127.0.0.1::8002", server_image.tag,
    )  # fmt: skip
    try:
        healthy = container.wait_healthy(timeout=180)
        MEASURED.append(f"server container healthy {healthy:.0f} s after start")
        yield container
    finally:
        container.remove()


def infer(target: str, model: str, images: np.ndarray) -> np.ndarray:
    client = triton.InferenceServerClient(target)
    try:
        given = triton.InferInput(INPUT_NAME, list(images.shape), "FP32")
        given.set_data_from_numpy(images.astype(np.float32))
        wanted = [triton.InferRequestedOutput(OUTPUT_NAME)]
        result = client.infer(model, [given], outputs=wanted, client_timeout=30)
        return result.as_numpy(OUTPUT_NAME)
    finally:
        client.close()


def infer_http(address: str, model: str, images: np.ndarray) -> np.ndarray:
    """The same call over HTTP/REST, with tritonclient.http."""
    client = httpclient.InferenceServerClient(address)
    try:
        given = httpclient.InferInput(INPUT_NAME, list(images.shape), "FP32")
        given.set_data_from_numpy(images.astype(np.float32))
        return client.infer(model, [given]).as_numpy(OUTPUT_NAME)
    finally:
        client.close()


def metrics(address: str) -> dict[str, list[Any]]:
    """Every sample on http://ADDRESS/metrics, by sample name."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def test_server_image_size_is_kept_down(docker: Docker, server_image: Image) -> None:
    (base,) = {
        line.split()[1]
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if re.match(r"FROM \S+ AS server$", line)
    }
    base_mb = docker.inspect("image", base)["Size"] / 1e6
    added = server_image.size_mb - base_mb
    MEASURED.append(f"server image: {added:.0f} MB on top of {base} ({base_mb:.0f} MB)")
    assert added <= SERVER_LAYERS_LIMIT_MB, (
        f"the server image adds {added:.0f} MB to {base}, more than {SERVER_LAYERS_LIMIT_MB} MB"
    )


def test_server_runs_as_a_non_root_user_on_a_read_only_root(server: Container) -> None:
    config = server.docker.inspect(server.name)
    assert config["Config"]["User"] == f"{USER}:{USER}", config["Config"]["User"]
    status = process_status(server)
    assert status["Uid"].split() == [USER] * 4 and status["Gid"].split() == [USER] * 4, status
    assert config["HostConfig"]["ReadonlyRootfs"]
    for path in ("/app/probe", "/models/probe"):
        refused = server.exec("touch", path, check=False)
        assert "Read-only file system" in refused, refused


def test_server_becomes_healthy_by_its_own_healthcheck(server: Container) -> None:
    config = server.docker.inspect(server.name)
    command = config["Config"]["Healthcheck"]["Test"]
    assert command[:4] == ["CMD", "python", "-m", "server.healthcheck"], command
    health = server.state()["Health"]
    assert health["Status"] == "healthy", health
    assert health["Log"] and health["Log"][-1]["ExitCode"] == 0, health["Log"]


@pytest.mark.parametrize("model", MODELS)
def test_server_answers_tritonclient_with_the_reference_outputs(
    server: Container, model: str, tmp_path: Path
) -> None:
    reference = copy_out(server, f"/models/{model}/1/{REFERENCE_FILE}", tmp_path / "ref.npz")
    with np.load(reference) as arrays:
        inputs, expected = arrays["inputs"], arrays["outputs"]
    assert inputs.shape[1:] == SHAPES[model] and len(inputs) == len(expected)
    answered = infer(server.address(8001), model, inputs)
    np.testing.assert_allclose(answered, expected, atol=1e-4)
    np.testing.assert_allclose(infer_http(server.address(8000), model, inputs), answered, atol=1e-6)


def test_server_serves_metrics(server: Container) -> None:
    infer(server.address(8001), "fashion_mnist", np.zeros((2, *SHAPES["fashion_mnist"])))
    samples = metrics(server.address(8002))
    ready = {s.labels["model"]: s.value for s in samples["imgserve_model_ready"]}
    assert ready == dict.fromkeys(MODELS, 1.0), ready
    answered = [
        s.value
        for s in samples["imgserve_requests_total"]
        if s.labels["model"] == "fashion_mnist" and s.labels["code"] == "OK"
    ]  # one series per API, each from the start
    assert sum(answered) >= 1, samples["imgserve_requests_total"]


def test_docker_stop_ends_the_server_with_exit_code_0_while_it_answers(
    server: Container,
) -> None:
    """`docker stop` with Docker's default timeout (10 s, then SIGKILL) while a client keeps
    calling: the server drains and exits 0 by itself. The image's grace period (how long the
    server drains at most) leaves room for the rest of the shutdown within those 10 s."""
    env = dict(item.split("=", 1) for item in server.docker.inspect(server.name)["Config"]["Env"])
    grace = float(env["SERVER_GRACE_PERIOD_S"])
    assert grace <= DOCKER_STOP_TIMEOUT_S - 2, f"SERVER_GRACE_PERIOD_S={grace} in the image"
    target = server.address(8001)
    images = np.random.default_rng(0).random((4, *SHAPES["cifar10"]))
    answered: list[int] = []
    errors: list[str] = []

    def call_until_refused() -> None:
        while not errors:
            try:
                infer(target, "cifar10", images)
                answered.append(1)
            except InferenceServerException as exc:
                errors.append(str(exc))

    caller = threading.Thread(target=call_until_refused, daemon=True)
    caller.start()
    deadline = time.monotonic() + 30
    while len(answered) < 20 and time.monotonic() < deadline and caller.is_alive():
        time.sleep(0.05)
    assert len(answered) >= 20, f"answered {len(answered)} before the stop: {errors}"
    start = time.monotonic()
    server.docker("stop", server.name, timeout=60)
    stopped = time.monotonic() - start
    caller.join(timeout=60)
    assert not caller.is_alive(), "a call hung after the server stopped"
    state = server.state()
    assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, server.logs())
    MEASURED.append(f"server stopped {stopped:.1f} s after docker stop, while answering")
    assert stopped < DOCKER_STOP_TIMEOUT_S, f"docker stop took {stopped:.1f} s: killed?"
    assert re.search(r"stopped after \d", server.logs()), server.logs()


# --- the server, with the Deployment's settings -----------------------------------------------


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return manifest_pod(K8S / "deployment.yaml")


@pytest.fixture(scope="module")
def kube_server(
    docker: Docker,
    server_image: Image,
    repository: str,
    deployment: dict[str, Any],
    volumes: Callable[[str], str],
) -> Iterator[Container]:
    container = Container(docker, f"{RUN}-kube-server")
    spec = only(deployment["containers"], "server")
    options, command = kube_run_args(deployment, spec, {"imgserve-models": repository}, volumes)
    docker("run", "--detach", "--name", container.name, *options, server_image.tag, *command)
    try:
        yield container
    finally:
        container.remove()


def health_check(address: str, service: str, timeout: float) -> str:
    """One grpc.health.v1 Check, as the kubelet's gRPC probe sends it: the status name, or
    the gRPC error code's name."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def test_deployment_settings_apply_to_the_server_process(
    kube_server: Container, deployment: dict[str, Any]
) -> None:
    security = only(deployment["containers"], "server")["securityContext"]
    assert security["readOnlyRootFilesystem"] and security["capabilities"]["drop"] == ["ALL"]
    status = process_status(kube_server)
    user, group = (
        deployment["securityContext"]["runAsUser"],
        deployment["securityContext"]["runAsGroup"],
    )
    assert status["Uid"].split()[0] == str(user) and status["Gid"].split()[0] == str(group)
    assert str(deployment["securityContext"]["fsGroup"]) in status["Groups"].split()
    assert int(status["CapEff"], 16) == 0 and status["NoNewPrivs"] == "1", status
    refused = kube_server.exec("touch", "/app/probe", check=False)
    assert "Read-only file system" in refused, refused
    environment = dict(
        line.split("=", 1)
        for line in kube_server.exec("cat", "/proc/1/environ").split("\0")
        if "=" in line
    )
    settings = config_map("imgserve-config")
    assert {k: environment.get(k) for k in settings} == settings


def test_deployment_probes_pass_as_the_kubelet_sends_them(
    kube_server: Container, deployment: dict[str, Any]
) -> None:
    spec = only(deployment["containers"], "server")
    declared = {port["containerPort"] for port in spec["ports"]}
    startup = spec["startupProbe"]
    # The startup probe: every periodSeconds, up to failureThreshold tries; here tried every
    # second, inside the same allowance.
    allowance = (
        startup.get("initialDelaySeconds", 0)
        + startup["periodSeconds"] * startup["failureThreshold"]
    )
    assert startup["grpc"]["port"] in declared
    address = kube_server.address(startup["grpc"]["port"])
    answers = []
    while time.monotonic() - kube_server.started < allowance:
        answers.append(health_check(address, startup["grpc"]["service"], startup["timeoutSeconds"]))
        if answers[-1] == "SERVING":
            break
        assert kube_server.state()["Running"], kube_server.logs()
        time.sleep(1)
    assert answers and answers[-1] == "SERVING", (answers[-5:], kube_server.logs())
    passed = time.monotonic() - kube_server.started
    MEASURED.append(f"Deployment settings: the startup probe passed {passed:.0f} s after start")
    for name in ("readinessProbe", "livenessProbe"):
        probe = spec[name]
        assert probe["grpc"]["port"] in declared
        answer = health_check(
            kube_server.address(probe["grpc"]["port"]),
            probe["grpc"]["service"],
            probe["timeoutSeconds"],
        )
        assert answer == "SERVING", (name, answer)


def test_deployment_serves_on_its_declared_ports(
    kube_server: Container, deployment: dict[str, Any]
) -> None:
    spec = only(deployment["containers"], "server")
    ports = {port["name"]: port["containerPort"] for port in spec["ports"]}
    settings = config_map("imgserve-config")
    assert ports == {
        "http": int(settings["SERVER_HTTP_PORT"]),
        "grpc": int(settings["SERVER_GRPC_PORT"]),
        "metrics": int(settings["SERVER_METRICS_PORT"]),
    }
    deadline = time.monotonic() + 120
    while health_check(kube_server.address(ports["grpc"]), "", 4) != "SERVING":
        assert time.monotonic() < deadline, kube_server.logs()
        time.sleep(1)
    for model in settings["SERVER_MODELS"].split(","):
        probabilities = infer(
            kube_server.address(ports["grpc"]), model, np.zeros((1, *SHAPES[model]))
        )
        assert probabilities.shape == (1, 10)
        over_http = infer_http(
            kube_server.address(ports["http"]), model, np.zeros((1, *SHAPES[model]))
        )
        np.testing.assert_allclose(over_http, probabilities, atol=1e-6)
    assert "imgserve_model_ready" in metrics(kube_server.address(ports["metrics"]))


def test_init_container_waits_for_the_models_then_lets_the_server_start(
    docker: Docker,
    server_image: Image,
    repository: str,
    deployment: dict[str, Any],
    volumes: Callable[[str], str],
) -> None:
    spec = only(deployment["initContainers"], "wait-for-models")
    for claim, expect_done in ((volumes("empty"), False), (repository, True)):
        options, command = kube_run_args(deployment, spec, {"imgserve-models": claim}, volumes)
        container = Container(docker, f"{RUN}-init-{int(expect_done)}")
        docker("run", "--detach", "--name", container.name, *options, server_image.tag, *command)
        try:
            deadline = time.monotonic() + 30
            while container.state()["Running"] and time.monotonic() < deadline:
                if not expect_done and "waiting for" in container.logs():
                    break
                time.sleep(0.5)
            state = container.state()
            if expect_done:
                assert not state["Running"] and state["ExitCode"] == 0, (state, container.logs())
            else:
                assert state["Running"], (state, container.logs())
                assert "waiting for fashion_mnist cifar10 in /models" in container.logs()
        finally:
            container.remove()


# --- the compose stack --------------------------------------------------------------------------


class Prometheus:
    def __init__(self, address: str) -> None:
        self.url = f"http://{address}"

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        return self.api("query", query=promql)["result"]

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]


@dataclass
class Stack:
    files: list[Path]
    up_s: float

    def container(self, service: str, docker: Docker) -> Container:
        ids = compose("ps", "--all", "--quiet", service, files=self.files).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return Container(docker, ids[0])

    def logs(self) -> str:
        result = run(
            [tool("docker-compose"), "-p", RUN, *[a for f in self.files for a in ("-f", str(f))],
             "logs", "--no-color", "--tail", "30"],
            timeout=60, env=COMPOSE_ENV,
        )  # fmt: skip
        return result.stdout[-6000:]


@pytest.fixture(scope="module")
def stack(
    server_image: Image,
    trainer_image: Image,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """`docker compose up` of the trainer, the server and Prometheus. An override file gives
    the images this run built (so nothing is rebuilt or pulled) and publishes the ports on
    loopback ports the engine picks (so a stack already running does not collide)."""
    override = tmp_path_factory.mktemp("compose") / "override.yml"
    override.write_text(
        f"services:\n"
        f"  trainer:\n    image: {trainer_image.tag}\n"
        f"  server:\n    image: {server_image.tag}\n"
        f"    ports: !override\n      - 127.0.0.1::8000\n      - 127.0.0.1::8001\n"
        f"      - 127.0.0.1::8002\n"
        f"  prometheus:\n    ports: !override\n      - 127.0.0.1::9090\n"
    )
    files = [COMPOSE, override]
    start = time.monotonic()
    stack = Stack(files, 0.0)
    try:
        try:
            compose(
                "up", "--detach", "--no-build", "--pull", "never", "trainer", "server",
                "prometheus", files=files, timeout=900,
            )  # fmt: skip
        except DockerError as exc:
            raise DockerError(f"{exc}\nThe stack's logs:\n{stack.logs()}") from None
        stack.up_s = time.monotonic() - start
        MEASURED.append(f"compose up (trainer run, then server and Prometheus): {stack.up_s:.0f} s")
        yield stack
    finally:
        compose(
            "down", "--volumes", "--remove-orphans", "--timeout", "30", files=files, timeout=180
        )


def test_compose_trains_then_serves_the_trained_repository(stack: Stack, docker: Docker) -> None:
    trainer = stack.container("trainer", docker)
    state = trainer.state()
    assert not state["Running"] and state["ExitCode"] == 0, (state, trainer.logs())
    assert f"built {list(MODELS)}" in trainer.logs()
    server = stack.container("server", docker)
    assert server.state()["StartedAt"] > state["FinishedAt"], "the server started before"
    server.wait_healthy(timeout=180)
    for model in MODELS:
        probabilities = infer(server.address(8001), model, np.zeros((3, *SHAPES[model])))
        assert probabilities.shape == (3, 10)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
        over_http = infer_http(server.address(8000), model, np.zeros((3, *SHAPES[model])))
        np.testing.assert_allclose(over_http, probabilities, atol=1e-6)


def test_compose_prometheus_scrapes_the_server_and_evaluates_the_alert_rules(
    stack: Stack, docker: Docker
) -> None:
    server = stack.container("server", docker)
    server.wait_healthy(timeout=180)
    prometheus = Prometheus(stack.container("prometheus", docker).address(9090))
    target = server.address(8001)
    stop = threading.Event()

    def load() -> None:
        """A trickle of requests (and a bad one each round), so that rates have data."""
        while not stop.is_set():
            for model in MODELS:
                infer(target, model, np.zeros((1, *SHAPES[model])))
            with contextlib.suppress(InferenceServerException):
                infer(target, "fashion_mnist", np.zeros((1, 1, 27, 27)))
            stop.wait(0.2)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    expressions = alert_expressions()
    expected_without = set(NO_DATA_IN_THE_STACK)
    start = time.monotonic()
    try:
        deadline = start + 180
        while True:
            up = prometheus.query('up{job="imgserve"}')
            rules = prometheus.rules()
            empty = {
                e.where for e in expressions
                if not any(np.isfinite(float(s["value"][1])) for s in prometheus.query(e.promql))
            }  # fmt: skip
            evaluated = all(rule["health"] == "ok" for rule in rules)
            if up and up[0]["value"][1] == "1" and evaluated and empty <= expected_without:
                break
            if time.monotonic() > deadline:
                health = [(rule["name"], rule["health"]) for rule in rules]
                missing = sorted(empty - expected_without)
                raise AssertionError(
                    f"after {deadline - start:.0f} s: up={up}, rules={health}, "
                    f"no data for {missing}\n{stack.logs()}"
                )
            assert loader.is_alive(), "the load stopped: the server stopped answering"
            time.sleep(2)
    finally:
        stop.set()
        loader.join(timeout=30)
    waited = time.monotonic() - start
    MEASURED.append(f"compose: the server scraped and the rules with data after {waited:.0f} s")
    assert up[0]["metric"]["instance"] == "server:8002"
    assert empty == expected_without, (
        f"expected no data only for {NO_DATA_IN_THE_STACK}, got {empty}"
    )
    assert len(rules) == len(expressions)
    for rule in rules:
        assert rule["state"] != "firing", rule
