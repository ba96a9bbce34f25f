"""Kubernetes and KServe manifests: built-in kinds validated offline by kubernetes-validate
--strict (the Kubernetes OpenAPI schemas; unknown fields are errors), custom resources and
the kustomizations read with yaml and checked for the fields the deployment relies on, and
the pieces checked against each other (ports, labels, paths, images).

No cluster here: nothing is applied. The GPU overlay is rendered by applying its JSON
patches below, and the result validated like the base.
"""

from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_tools import (
    ALERTS,
    BUILD_REPOSITORY,
    DEPLOY,
    ROOT,
    run,
    tool,
    yaml_document,
    yaml_documents,
)

from modelrepo.config import format_config
from modelrepo.layout import CONFIG_FILE, PLATFORM_ONNX, list_versions
from server.api.health import LIVENESS
from training.model_config import build_config
from training.repository_build import MODELS as REPOSITORY_MODELS

K8S = DEPLOY / "k8s"
KSERVE = DEPLOY / "kserve"
BUILT_IN = {"v1", "apps/v1", "batch/v1", "autoscaling/v2", "policy/v1"}


def manifests() -> dict[str, dict[str, Any]]:
    """kind -> the one manifest of that kind in the base kustomization."""
    found = {}
    for name in yaml_document(K8S / "kustomization.yaml")["resources"]:
        for doc in yaml_documents(K8S / name):
            assert doc["kind"] not in found, f"two {doc['kind']} manifests"
            found[doc["kind"]] = doc
    return found


@pytest.fixture(scope="module")
def base() -> dict[str, dict[str, Any]]:
    return manifests()


def container(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in manifest["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def validate(tmp_path: Path, docs: dict[str, dict[str, Any]]) -> None:
    """kubernetes-validate --strict on each built-in manifest (one process for all)."""
    files = []
    for kind, doc in docs.items():
        if doc["apiVersion"] in BUILT_IN:
            files.append(tmp_path / f"{kind}.yaml")
            files[-1].write_text(yaml.safe_dump(doc))
    result = run([tool("kubernetes-validate"), "--strict", *map(str, files)], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for file in files:
        assert f"{file} passed" in result.stdout, result.stdout


def test_base_kustomization_lists_every_manifest() -> None:
    listed = yaml_document(K8S / "kustomization.yaml")["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk


def test_builtin_kinds_pass_strict_validation(base: Any, tmp_path: Path) -> None:
    kinds = {kind for kind, doc in base.items() if doc["apiVersion"] in BUILT_IN}
    assert kinds == {
        "ConfigMap", "PersistentVolumeClaim", "Job", "Deployment", "Service",
        "HorizontalPodAutoscaler", "PodDisruptionBudget",
    }  # fmt: skip
    validate(tmp_path, base)
    example = yaml_document(K8S / "examples" / "hpa-queue-time.yaml")
    validate(tmp_path, {"HpaQueueTime": example})


def test_strict_validation_rejects_an_unknown_field(base: Any, tmp_path: Path) -> None:
    """Guards the test above against a validator that accepts anything."""
    broken = copy.deepcopy(base["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(AssertionError, match="readinesProbe"):
        validate(tmp_path, {"Deployment": broken})


def test_service_pdb_and_hpa_select_the_deployment(base: Any) -> None:
    deployment = base["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert base["Service"]["spec"]["selector"] == selector
    assert base["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector
    hpa = base["HorizontalPodAutoscaler"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2 > base["PodDisruptionBudget"]["spec"]["minAvailable"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_ports_and_probes_agree_with_the_settings(base: Any) -> None:
    settings = base["ConfigMap"]["data"]
    server = container(base["Deployment"], "server")
    assert server["envFrom"] == [{"configMapRef": {"name": base["ConfigMap"]["metadata"]["name"]}}]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"http": 8000, "grpc": int(settings["SERVER_GRPC_PORT"]), "metrics": 8002}
    assert ports["metrics"] == int(settings["SERVER_METRICS_PORT"])
    assert ports["http"] == int(settings["SERVER_HTTP_PORT"])
    service_ports = {p["name"]: p for p in base["Service"]["spec"]["ports"]}
    assert set(service_ports) == {"http", "grpc", "metrics"}
    for name, port in service_ports.items():
        assert port["targetPort"] == name and port["port"] == ports[name]
    for probe in ("startupProbe", "readinessProbe"):
        assert server[probe]["grpc"] == {"port": ports["grpc"], "service": ""}, probe
    check_probe_patience(server)
    assert server["livenessProbe"]["grpc"] == {"port": ports["grpc"], "service": LIVENESS}
    # Liveness must not kill a pod that is draining: it tolerates longer than the drain.
    liveness = server["livenessProbe"]
    grace = float(settings["SERVER_GRACE_PERIOD_S"])
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > grace
    assert base["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace


def check_probe_patience(container: dict[str, Any]) -> None:
    """A saturated server answers health late: each probe waits a few seconds (the default
    is 1 s) and readiness takes 3 misses in a row before the pod leaves the Service."""
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        if name in container:
            assert 3 <= container[name].get("timeoutSeconds", 1) <= 5, (name, container[name])
    assert container["readinessProbe"].get("failureThreshold", 3) >= 3


def test_model_repository_path_is_the_pvc_mount_everywhere(base: Any) -> None:
    settings = base["ConfigMap"]["data"]
    pvc = base["PersistentVolumeClaim"]["metadata"]["name"]
    pod = base["Deployment"]["spec"]["template"]["spec"]
    claims = {
        v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]
    }
    models = {name for name, claim in claims.items() if claim == pvc}
    assert len(models) == 1
    for c in pod["containers"] + pod["initContainers"]:
        (mount,) = [m for m in c["volumeMounts"] if m["name"] in models]
        assert mount["mountPath"] == settings["SERVER_MODEL_REPOSITORY"] and mount["readOnly"]
    job_pod = base["Job"]["spec"]["template"]["spec"]
    (job_volume,) = [v["name"] for v in job_pod["volumes"] if "persistentVolumeClaim" in v]
    (trainer,) = job_pod["containers"]
    (mount,) = [m for m in trainer["volumeMounts"] if m["name"] == job_volume]
    args = trainer["args"]
    assert args[args.index("--model-repository") + 1] == mount["mountPath"]


def test_build_job_runs_build_repository_itself(base: Any) -> None:
    """No shell guard that keeps whatever is in the volume (a half-built repository, or just
    lost+found): the image's `python -m training` entrypoint runs build-repository, which
    builds exactly the models that are missing (test below), the same command as compose's."""
    (trainer,) = base["Job"]["spec"]["template"]["spec"]["containers"]
    assert "command" not in trainer
    assert trainer["args"] == BUILD_REPOSITORY
    assert base["Job"]["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"


def wait_for_models(base: dict[str, dict[str, Any]], repository: Path, models: str) -> int:
    """Runs the init container's script as Kubernetes would (`$$` -> `$`) for 2 s: its exit
    status, or 124 while it still waits."""
    pod = base["Deployment"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"] == ["/bin/sh", "-c"]
    script = init["args"][0].replace("$$", "$")
    env = {"PATH": os.environ["PATH"], "SERVER_MODEL_REPOSITORY": str(repository)}
    env["SERVER_MODELS"] = models
    result = run(["timeout", "2", "/bin/sh", "-c", script], env=env)
    if result.returncode == 124:
        assert "waiting for" in result.stdout, result.stdout
    return result.returncode


def add_model(repository: Path, name: str, *, config: bool = True, version: bool = True) -> None:
    (repository / name).mkdir(parents=True, exist_ok=True)
    if config:
        (repository / name / "config.pbtxt").write_text(f'name: "{name}"\n')
    if version:
        (repository / name / "1").mkdir(exist_ok=True)


def test_init_container_waits_for_every_model_to_have_config_and_version(
    base: Any, tmp_path: Path
) -> None:
    settings = base["ConfigMap"]["data"]
    assert settings["SERVER_MODELS"].split(",") == [m.name for m in REPOSITORY_MODELS]
    models = settings["SERVER_MODELS"]
    repository = tmp_path / "models"
    (repository / "lost+found").mkdir(parents=True)  # what a fresh ext4 volume holds
    assert wait_for_models(base, repository, models) == 124
    assert wait_for_models(base, repository, "") == 124  # lost+found is not a model
    add_model(repository, "fashion_mnist")
    add_model(repository, "cifar10", version=False)  # an export cut before its rename
    (repository / "cifar10" / ".export-0123456789ab").mkdir()
    assert wait_for_models(base, repository, models) == 124
    assert wait_for_models(base, repository, "") == 124
    add_model(repository, "cifar10")
    assert wait_for_models(base, repository, models) == 0
    assert wait_for_models(base, repository, "") == 0


def test_build_repository_completes_a_half_built_repository(base: Any, tmp_path: Path) -> None:
    """The Job's own arguments against a repository an interrupted build left behind:
    lost+found, one model complete, the other with its config.pbtxt and a staging folder but
    no version. The complete model is kept as it is, the other is built, and the init
    container then lets the servers start."""
    repository = tmp_path / "models"
    (repository / "lost+found").mkdir(parents=True)
    add_model(repository, "fashion_mnist")
    kept = sorted(p.relative_to(repository) for p in (repository / "fashion_mnist").rglob("*"))
    # What export writes before the rename that publishes the version.
    cifar10 = repository / "cifar10"
    cifar10.mkdir()
    config = build_config("cifar10", PLATFORM_ONNX, (3, 32, 32), 10, None, None, None)
    (cifar10 / CONFIG_FILE).write_text(format_config(config))
    staging = cifar10 / ".export-0123456789ab"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(b"half a file")
    (trainer,) = base["Job"]["spec"]["template"]["spec"]["containers"]
    paths = {"/models": repository, "/data": tmp_path / "data"}
    paths["/data/checkpoints"] = tmp_path / "data" / "checkpoints"
    args = [str(paths.get(arg, arg)) for arg in trainer["args"]]
    offline = ["--epochs", "1", "--device", "cpu", "--no-download",
               "--synthetic-train-size", "128", "--synthetic-test-size", "32"]  # fmt: skip
    result = run([sys.executable, "-m", "training", *args, *offline], timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fashion_mnist: version(s) [1] already in" in result.stdout
    assert (
        sorted(p.relative_to(repository) for p in (repository / "fashion_mnist").rglob("*")) == kept
    )
    assert list_versions(repository / "cifar10") == [1]
    assert (repository / "cifar10" / "1" / "model.onnx").is_file()
    assert sorted(p.name for p in repository.iterdir()) == [
        "cifar10",
        "fashion_mnist",
        "lost+found",
    ]
    assert wait_for_models(base, repository, base["ConfigMap"]["data"]["SERVER_MODELS"]) == 0


def test_pods_run_non_root_with_a_read_only_root_and_resources(base: Any) -> None:
    user = re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert user is not None
    for kind in ("Deployment", "Job"):
        pod = base[kind]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == int(user[1])
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, (kind, c["name"])
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), (kind, c["name"])
            assert "memory" in c["resources"]["limits"], (kind, c["name"])


def test_images_match_the_compose_stack(base: Any) -> None:
    compose = yaml_document(DEPLOY / "docker-compose.yml")["services"]
    server = container(base["Deployment"], "server")
    assert server["image"] == compose["server"]["image"]
    (trainer,) = base["Job"]["spec"]["template"]["spec"]["containers"]
    assert trainer["image"] == compose["trainer"]["image"]


def test_servicemonitor_scrapes_the_metrics_port(base: Any) -> None:
    monitor = base["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = base["Service"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    # The job label is the Service name; the alert rules and the dashboard select job="imgserve".
    assert service["metadata"]["name"] == "imgserve"
    assert 'job="imgserve"' in (DEPLOY / "prometheus" / "alerts.yml").read_text()


def test_prometheusrule_carries_the_alert_rules_unchanged(base: Any) -> None:
    """deploy/k8s/prometheusrule.yaml is a copy of deploy/prometheus/alerts.yml's groups (the
    one promtool tests): same alerts, same expressions, same everything."""
    rule = base["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"] == base["ServiceMonitor"]["metadata"]["labels"]
    copied, tested = rule["spec"]["groups"], yaml_document(ALERTS)["groups"]

    def alerts(groups: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(r["alert"], r["expr"]) for group in groups for r in group["rules"]]

    assert alerts(copied) == alerts(tested)
    assert copied == tested


def json_patch(doc: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
    """The `add` and `replace` operations of RFC 6902, as kustomize applies them."""
    doc = copy.deepcopy(doc)
    for op in operations:
        assert op["op"] in ("add", "replace"), op
        *parents, last = [
            part.replace("~1", "/").replace("~0", "~") for part in op["path"].split("/")[1:]
        ]
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            index = int(last)
            if op["op"] == "add":
                node.insert(index, op["value"])
            else:
                node[index] = op["value"]
        else:
            assert op["op"] == "add" or last in node, f"replace of a missing {op['path']}"
            node[last] = op["value"]
    return doc


def gpu_overlay(base: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    overlay = yaml_document(K8S / "gpu" / "kustomization.yaml")
    assert overlay["resources"] == [".."]
    rendered = dict(base)
    for patch in overlay["patches"]:
        target = patch["target"]
        doc = rendered[target["kind"]]
        assert doc["metadata"]["name"] == target["name"]
        rendered[target["kind"]] = json_patch(doc, yaml.safe_load(patch["patch"]))
    return rendered


def test_gpu_overlay_renders_valid_manifests_that_ask_for_a_gpu(base: Any, tmp_path: Path) -> None:
    rendered = gpu_overlay(base)
    validate(tmp_path, rendered)
    server = container(rendered["Deployment"], "server")
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert server["image"].endswith("-gpu")
    compose_gpu = yaml_document(DEPLOY / "docker-compose.gpu.yml")["services"]["server"]
    assert server["image"] == compose_gpu["image"]
    assert rendered["ConfigMap"]["data"]["SERVER_DEVICE"] == "cuda"
    tolerations = rendered["Deployment"]["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert "nvidia.com/gpu" not in container(base["Deployment"], "server")["resources"]["limits"]


def test_queue_time_autoscaling_example_uses_the_adapter_metric(base: Any) -> None:
    hpa = yaml_document(K8S / "examples" / "hpa-queue-time.yaml")
    (metric,) = hpa["spec"]["metrics"]
    (rule,) = yaml_document(K8S / "examples" / "prometheus-adapter-values.yaml")["rules"]["custom"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert re.fullmatch(rule["name"]["matches"], "imgserve_queue_duration_seconds_count")
    cpu_hpa = base["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == cpu_hpa["spec"]["scaleTargetRef"]
    # The same HPA name: it replaces the CPU one rather than fighting it.
    assert hpa["metadata"]["name"] == cpu_hpa["metadata"]["name"]


@pytest.mark.parametrize(
    ("path", "image", "device", "formats"),
    [
        ("servingruntime.yaml", "imgserve:0.1.0", "cpu", {"onnx"}),
        ("servingruntime-gpu.yaml", "imgserve:0.1.0-gpu", "cuda", {"onnx", "pytorch"}),
    ],
)
def test_kserve_runtimes_serve_grpc_v2_with_the_formats_their_image_runs(
    base: Any, tmp_path: Path, path: str, image: str, device: str, formats: set[str]
) -> None:
    """The CPU image has no torch, so only the GPU runtime (the server-gpu image, one GPU)
    claims TorchScript (`pytorch`)."""
    runtime = yaml_document(KSERVE / path)
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert runtime["kind"] == "ServingRuntime"
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["grpc-v2"]
    assert {f["name"] for f in spec["supportedModelFormats"]} == formats
    (server,) = spec["containers"]
    assert server["image"] == image
    env = {e["name"]: e["value"] for e in server["env"]}
    assert env["SERVER_MODEL_REPOSITORY"] == "/mnt/models"  # where KServe puts storageUri
    assert env["SERVER_DEVICE"] == device
    gpus = server["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == ("1" if device == "cuda" else None)
    (port,) = server["ports"]
    assert port["name"] == "h2c" and port["containerPort"] == int(env["SERVER_GRPC_PORT"])
    assert server["readinessProbe"]["grpc"]["port"] == port["containerPort"]
    check_probe_patience(server)
    assert spec["annotations"]["prometheus.kserve.io/port"] == env["SERVER_METRICS_PORT"]
    # The container is a valid Kubernetes container: validate it inside a Pod.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "servingruntime-container"},
        "spec": {"containers": spec["containers"]},
    }
    validate(tmp_path, {"Pod": pod})


def test_the_http_runtime_routes_v2_to_the_http_port(tmp_path: Path) -> None:
    """KServe routes one port per predictor: HTTP/REST has a runtime of its own, the CPU
    runtime's image and settings with `v2` on the HTTP port."""
    grpc_runtime = yaml_document(KSERVE / "servingruntime.yaml")["spec"]
    runtime = yaml_document(KSERVE / "servingruntime-http.yaml")
    assert runtime["kind"] == "ServingRuntime" and runtime["metadata"]["name"] == "imgserve-http"
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["v2"]
    assert spec["supportedModelFormats"] == grpc_runtime["supportedModelFormats"]
    (server,), (grpc_server,) = spec["containers"], grpc_runtime["containers"]
    assert server["image"] == grpc_server["image"]
    env = {e["name"]: e["value"] for e in server["env"]}
    grpc_env = {e["name"]: e["value"] for e in grpc_server["env"]}
    assert {k: v for k, v in grpc_env.items() if k != "SERVER_GRPC_PORT"}.items() <= env.items()
    (port,) = server["ports"]
    assert port["name"] == "http1" and port["containerPort"] == int(env["SERVER_HTTP_PORT"])
    probe = server["readinessProbe"]["httpGet"]
    assert probe == {"path": "/v2/health/ready", "port": port["containerPort"]}
    check_probe_patience(server)
    assert server["resources"] == grpc_server["resources"]
    assert server["securityContext"] == grpc_server["securityContext"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "servingruntime-http-container"},
        "spec": {"containers": spec["containers"]},
    }
    validate(tmp_path, {"Pod": pod})


def test_only_the_gpu_runtime_claims_torchscript() -> None:
    cpu = yaml_document(KSERVE / "servingruntime.yaml")["spec"]
    gpu = yaml_document(KSERVE / "servingruntime-gpu.yaml")["spec"]
    assert [f["name"] for f in cpu["supportedModelFormats"] if f["autoSelect"]] == ["onnx"]
    # Named by an InferenceService, never picked over the CPU runtime by itself.
    assert not any(f["autoSelect"] for f in gpu["supportedModelFormats"])
    (container,) = gpu["containers"]
    assert (
        container["image"]
        == yaml_document(DEPLOY / "docker-compose.gpu.yml")["services"]["server"]["image"]
    )


def test_kserve_inference_service_uses_the_runtime() -> None:
    runtime = yaml_document(KSERVE / "servingruntime.yaml")
    service = yaml_document(KSERVE / "inferenceservice.yaml")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    pvc = yaml_document(K8S / "pvc.yaml")["metadata"]["name"]
    assert model["storageUri"] == f"pvc://{pvc}/"
