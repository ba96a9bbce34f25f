"""The Dockerfile and the docker-compose stack, checked with real tools (hadolint,
docker-compose's own `config` validation) and read for what the deployment relies on.

These checks need no Docker engine; tests/test_deploy_containers.py builds the images and runs
them and the stack.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from deploy_tools import BUILD_REPOSITORY, DEPLOY, ROOT, run, tool

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
TARGETS = ("server", "server-gpu", "trainer")


def instructions(text: str) -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) per instruction, continuation lines joined."""
    joined = re.sub(r"\\\n(\s*#.*\n)*", " ", text)
    stage = ""
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.search(r"\bAS\s+(\S+)", rest, re.IGNORECASE)
            stage = match[1] if match else ""
        found.append((stage, keyword, rest.strip()))
    return found


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str, str]]:
    return instructions(DOCKERFILE.read_text())


def stage(dockerfile: list[tuple[str, str, str]], name: str) -> list[tuple[str, str]]:
    return [(keyword, rest) for where, keyword, rest in dockerfile if where == name]


# The project's Dockerfile, and the stand-in base images the CI machine builds.
LINTED = [DOCKERFILE, *sorted((DEPLOY / "ci").glob("*.Dockerfile"))]


@pytest.mark.parametrize("dockerfile", LINTED, ids=[str(p.relative_to(ROOT)) for p in LINTED])
def test_hadolint_finds_nothing_in_the_dockerfiles(dockerfile: Path) -> None:
    result = run([tool("hadolint"), "--no-color", str(dockerfile)])
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_really_lints(tmp_path: Path) -> None:
    """Guards the test above against a linter that passes everything."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install numpy\nUSER root\n")
    result = run([tool("hadolint"), "--no-color", str(bad)])
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout, result.stdout


@pytest.mark.parametrize("dockerfile", LINTED, ids=[str(p.relative_to(ROOT)) for p in LINTED])
def test_every_ignored_hadolint_rule_says_why(dockerfile: Path) -> None:
    lines = dockerfile.read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if "hadolint ignore=" in line]
    assert ignores, "expected the apt-get pin rule to be ignored visibly where apt installs"
    for i in ignores:
        assert lines[i - 1].lstrip().startswith("#") and "hadolint" not in lines[i - 1], (
            f"{dockerfile.name} line {i + 1}: an ignored rule needs a comment above it saying why"
        )


def test_the_three_targets_exist_and_the_cpu_server_is_the_default(dockerfile: Any) -> None:
    stages = [where for where, keyword, _ in dockerfile if keyword == "FROM"]
    assert set(TARGETS) <= set(stages), stages
    assert stages[-1] == "server", "the last stage is what `docker build .` builds"


def test_base_images_are_pinned_to_exact_tags(dockerfile: Any) -> None:
    stages = {where for where, keyword, _ in dockerfile if keyword == "FROM"}
    for where, keyword, rest in dockerfile:
        if keyword != "FROM":
            continue
        image = rest.split()[0]
        if image in stages:  # built on an earlier stage
            continue
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", f"{where}: {image} is not pinned to a tag"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{where}: {image}: tag is not an exact version"
    assert "latest" not in DOCKERFILE.read_text()


@pytest.mark.parametrize("target", ["server", "server-gpu"])
def test_server_images_run_the_server_as_a_non_root_user(dockerfile: Any, target: str) -> None:
    steps = stage(dockerfile, target)
    users = [rest for keyword, rest in steps if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert ("EXPOSE", "8000 8001 8002") in steps
    env = " ".join(rest for keyword, rest in steps if keyword == "ENV")
    assert "SERVER_MODEL_REPOSITORY=/models" in env
    cmd = [json.loads(rest) for keyword, rest in steps if keyword == "CMD"]
    assert cmd[-1] == ["python", "-m", "server"]


@pytest.mark.parametrize("target", ["server", "server-gpu"])
def test_server_healthcheck_is_a_grpc_health_check(dockerfile: Any, target: str) -> None:
    (check,) = [rest for keyword, rest in stage(dockerfile, target) if keyword == "HEALTHCHECK"]
    command = json.loads(check.partition("CMD")[2].strip())
    assert command[:3] == ["python", "-m", "server.healthcheck"], command
    assert (ROOT / "server" / "healthcheck.py").is_file()


def test_cpu_server_has_no_torch_and_gpu_server_has_onnxruntime_gpu_and_torch() -> None:
    pyproject = str(ROOT / "pyproject.toml")
    script = str(DEPLOY / "requirements.py")
    cpu = run([sys.executable, script, pyproject]).stdout.split()
    gpu_args = ["--extra", "torchscript", "--extra", "gpu", "--without", "onnxruntime"]
    gpu = run([sys.executable, script, *gpu_args, pyproject]).stdout.split()
    assert any(line.startswith("onnxruntime==") for line in cpu), cpu
    assert not any(line.startswith("torch") for line in cpu), cpu
    assert "onnxruntime-gpu==1.31.1" in gpu and any(line.startswith("torch==") for line in gpu)
    assert not any(line.startswith("onnxruntime==") for line in gpu), gpu
    # The Dockerfile asks for exactly these lists.
    text = DOCKERFILE.read_text()
    assert "python requirements.py pyproject.toml > server.txt" in text
    assert " ".join(gpu_args) in text


def test_requirements_script_refuses_an_unknown_extra() -> None:
    script = str(DEPLOY / "requirements.py")
    result = run([sys.executable, script, "--extra", "nope", str(ROOT / "pyproject.toml")])
    assert result.returncode == 2 and "no such extra" in result.stderr


def test_protobuf_code_is_generated_in_the_build_not_copied(dockerfile: Any) -> None:
    proto = stage(dockerfile, "proto")
    assert any(
        keyword == "RUN" and "grpc_tools.protoc" in rest and "--grpc_python_out=." in rest
        for keyword, rest in proto
    ), proto
    for target in TARGETS:
        copies = [rest for keyword, rest in stage(dockerfile, target) if keyword == "COPY"]
        assert "--from=proto /src/wire/ wire/" in copies, (target, copies)
    # Of wire/ only the package marker goes into the context, never stale generated code.
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert [line for line in ignore if "wire" in line] == ["!wire/__init__.py"]


def test_dependencies_are_installed_before_the_source_is_copied(dockerfile: Any) -> None:
    for target in ("server-gpu", "trainer"):
        steps = stage(dockerfile, target)
        install = next(i for i, (k, rest) in enumerate(steps) if "pip install" in rest)
        first_source = next(
            i for i, (k, rest) in enumerate(steps) if k == "COPY" and "--from" not in rest
        )
        assert install < first_source, target


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines.index("*") < min(i for i, line in enumerate(lines) if line.startswith("!")), (
        "expected an allow-list: exclude everything, then name what the build copies"
    )
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed >= {"pyproject.toml", "proto", "server", "modelrepo", "training"}
    assert not allowed & {".venv", "model_repository", "data", "checkpoints", "wire"}


def test_everything_the_dockerfile_copies_is_in_the_build_context(dockerfile: Any) -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for _, keyword, rest in dockerfile:
        if keyword == "COPY" and not rest.startswith("--from"):
            copied.update(source.rstrip("/") for source in rest.split()[:-1])
    assert copied, "expected COPY instructions from the build context"
    assert copied <= allowed, f"excluded by .dockerignore: {sorted(copied - allowed)}"
    for source in copied:
        assert (ROOT / source).exists(), source


# The stack refuses to start without a Grafana admin password: the tests give it one.
COMPOSE_ENV = {k: v for k, v in os.environ.items() if k != "EPOCHS"} | {
    "GRAFANA_ADMIN_PASSWORD": "compose-test-password"
}


def compose_config(*files: Path, env: dict[str, str] = COMPOSE_ENV) -> dict[str, Any]:
    args = [tool("docker-compose")]
    for file in files:
        args += ["-f", str(file)]
    checked = run([*args, "config", "-q"], env=env)
    assert checked.returncode == 0, checked.stderr
    rendered = run([*args, "config", "--format", "json"], env=env)
    assert rendered.returncode == 0, rendered.stderr
    return json.loads(rendered.stdout)


def test_compose_stack_is_valid_and_wired() -> None:
    services = compose_config(COMPOSE)["services"]
    assert set(services) == {"trainer", "server", "prometheus", "grafana"}
    trainer, server = services["trainer"], services["server"]
    assert trainer["build"]["target"] == "trainer" and server["build"]["target"] == "server"
    assert server["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    # No "only when empty" shell guard: build-repository itself skips the models already in
    # the volume and builds the missing ones (tests/test_deploy_k8s.py runs it on a
    # half-built repository), with the image's entrypoint, `python -m training`.
    assert trainer.get("entrypoint") is None
    assert trainer["command"] == [*BUILD_REPOSITORY, "--epochs", "3"]
    assert {"type": "volume", "source": "models", "target": "/models", "volume": {}} in trainer[
        "volumes"
    ]
    models = [v for v in server["volumes"] if v["source"] == "models"]
    assert models and models[0]["target"] == "/models" and models[0]["read_only"]
    assert server["environment"]["SERVER_MODEL_REPOSITORY"] == "/models"
    assert {p["target"] for p in server["ports"]} == {8000, 8001, 8002}
    assert server["environment"]["SERVER_HTTP_PORT"] == "8000"


def test_compose_publishes_ports_on_loopback_only() -> None:
    services = compose_config(COMPOSE)["services"]
    published = [(name, p) for name, s in services.items() for p in s.get("ports", [])]
    assert {p["target"] for _, p in published} == {8000, 8001, 8002, 9090, 3000}
    for name, port in published:
        assert port["host_ip"] == "127.0.0.1", (name, port)


def test_compose_needs_a_grafana_admin_password() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRAFANA_ADMIN_PASSWORD"}
    refused = run([tool("docker-compose"), "-f", str(COMPOSE), "config", "-q"], env=env)
    assert refused.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in refused.stderr
    grafana = compose_config(COMPOSE)["services"]["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == COMPOSE_ENV["GRAFANA_ADMIN_PASSWORD"]


def test_compose_mounts_prometheus_and_grafana_files_that_exist() -> None:
    services = compose_config(COMPOSE)["services"]
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{name}: {image} is not pinned"
        for volume in services[name]["volumes"]:
            if volume["type"] == "bind":
                assert Path(volume["source"]).is_dir(), volume["source"]
    prometheus = services["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert (DEPLOY / "prometheus" / "prometheus.yml").is_file()
    grafana = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana" / "dashboards" / Path(grafana).name).is_file()


def test_compose_gpu_override_asks_for_a_gpu() -> None:
    services = compose_config(COMPOSE, COMPOSE_GPU)["services"]
    server = services["server"]
    assert server["build"]["target"] == "server-gpu"
    assert server["environment"]["SERVER_DEVICE"] == "cuda"
    for name in ("server", "trainer"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    # The rest of the stack is the CPU one, unchanged.
    assert server["depends_on"]["trainer"]["condition"] == "service_completed_successfully"


def test_compose_validation_catches_a_broken_file(tmp_path: Path) -> None:
    """Guards the tests above against a validator that accepts anything."""
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  a:\n    image: x\n    depends_on: [missing]\n")
    result = run([tool("docker-compose"), "-f", str(broken), "config", "-q"], env=COMPOSE_ENV)
    assert result.returncode != 0 and "missing" in result.stderr


def test_server_image_sources_are_all_the_server_needs(dockerfile: Any, tmp_path: Path) -> None:
    """Copies what the server stage copies (the generated wire/ code standing in for the proto
    stage's) and imports every module of the server from there: a module that needs a package
    the image leaves out would be found in the checkout instead, and fail the check."""
    app = tmp_path / "app"
    for keyword, rest in stage(dockerfile, "server"):
        if keyword != "COPY" or rest.startswith("--from=server-deps"):  # the venv: ours is it
            continue
        source = "wire/" if rest.startswith("--from=proto") else rest.split()[0]
        shutil.copytree(ROOT / source, app / source, ignore=shutil.ignore_patterns("*.pyi"))
    assert sorted(p.name for p in app.iterdir()) == ["modelrepo", "server", "wire"]
    script = (
        "import importlib, pkgutil, sys, server\n"
        "for m in pkgutil.walk_packages(server.__path__, 'server.'):\n"
        "    importlib.import_module(m.name)\n"
        "ours = ('server', 'modelrepo', 'wire', 'client', 'training')\n"
        "for name, module in sorted(sys.modules.items()):\n"
        "    if name.split('.')[0] in ours:\n"
        "        print(getattr(module, '__file__', None) or list(module.__path__)[0])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(app)}
    result = run([sys.executable, "-c", script], cwd=app, env=env)
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.split()
    assert any(path.endswith("server/healthcheck.py") for path in loaded)
    outside = [path for path in loaded if not path.startswith(str(app))]
    assert not outside, f"imported from outside the image's /app: {outside}"


OUR_PACKAGES = frozenset({"server", "modelrepo", "wire", "training", "client"})
# Import names whose distribution the dev venv cannot tell, because the venv holds a sibling
# (onnxruntime, not onnxruntime-gpu) or none (nvidia-ml-py needs a GPU stack).
OTHER_PROVIDERS = {"onnxruntime": {"onnxruntime-gpu"}, "pynvml": {"nvidia-ml-py"}}


def _requirements_module() -> Any:
    spec = importlib.util.spec_from_file_location("deploy_requirements", DEPLOY / "requirements.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_requirements(dockerfile: Any, target: str) -> set[str]:
    """Normalised names of what `target`'s venv installs: the requirement file it (or the stage
    whose venv it copies) installs, made by the very `requirements.py` call of the Dockerfile."""
    made = {}
    for keyword, rest in stage(dockerfile, "requirements"):
        if keyword == "RUN":
            for call in re.findall(r"python requirements\.py ([^>]*)>\s*(\S+)", rest):
                made[call[1]] = shlex.split(call[0])
    stages, files = [target], []
    for name in stages:
        for keyword, rest in stage(dockerfile, name):
            source = re.match(r"--from=(\S+) (\S+)", rest) if keyword == "COPY" else None
            if source and source[1] == "requirements":
                files.append(Path(source[2]).name)
            elif source and source[1] != "proto":
                stages.append(source[1])
    (requirement_file,) = files
    script = _requirements_module()
    *options, pyproject = made[requirement_file]
    flags: dict[str, list[str]] = {"--extra": [], "--without": [], "--only": []}
    for flag, value in zip(options[::2], options[1::2], strict=True):
        flags[flag].append(value)
    lines = script.requirements(
        ROOT / pyproject, flags["--extra"], flags["--without"], flags["--only"]
    )
    return {script.requirement_name(line) for line in lines}


def third_party_imports(packages: list[str]) -> dict[str, dict[str, bool]]:
    """import name -> {file: imported at module level} for every import of a third-party
    package in `packages` (imports under `if TYPE_CHECKING:` left out: they never run)."""
    found: dict[str, dict[str, bool]] = {}

    def visit(node: ast.AST, where: str, top: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            root = name.split(".")[0]
            if root not in OUR_PACKAGES | {"__future__"} | sys.stdlib_module_names:
                seen = found.setdefault(root, {})
                seen[where] = seen.get(where, False) or top
        inner = top and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for child in ast.iter_child_nodes(node):
            visit(child, where, inner)

    for package in packages:
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, f"no Python files in {package}/ (wire/: run `make proto`)"
        for path in files:
            visit(ast.parse(path.read_text()), str(path.relative_to(ROOT)), True)
    return found


def copied_packages(dockerfile: Any, target: str) -> list[str]:
    copies = [rest for keyword, rest in stage(dockerfile, target) if keyword == "COPY"]
    ours = [rest.split()[-1].strip("/") for rest in copies if "--from=requirements" not in rest]
    return sorted(name for name in ours if name in OUR_PACKAGES)


@pytest.mark.parametrize("target", TARGETS)
def test_every_third_party_import_is_installed_in_the_image(dockerfile: Any, target: str) -> None:
    """Reads the imports of the code each image copies and maps them to distributions
    (importlib.metadata.packages_distributions): a package the code imports but the image's
    requirement list leaves out fails here, whatever the dev venv holds. The CPU server may
    leave out what it imports only inside functions (torch, pynvml: TorchScript and GPU
    metrics, which it reports as unavailable); every other image must have everything."""
    packages = copied_packages(dockerfile, target)
    expected = {
        "server": ["modelrepo", "server", "wire"],
        "trainer": ["modelrepo", "training", "wire"],
    }
    assert packages == expected.get(target, expected["server"]), packages
    installed = stage_requirements(dockerfile, target)
    providers = importlib.metadata.packages_distributions()
    script = _requirements_module()
    missing = []
    for name, files in sorted(third_party_imports(packages).items()):
        distributions = {script.requirement_name(d) for d in providers.get(name, [])}
        distributions |= OTHER_PROVIDERS.get(name, set())
        assert distributions, f"{name} (imported by {sorted(files)}): no known distribution"
        at_import = [file for file, top in files.items() if top]
        if distributions & installed or (target == "server" and not at_import):
            continue
        missing.append(f"{name} ({', '.join(sorted(distributions))}) for {sorted(files)}")
    assert not missing, f"{target}: imported but not installed: {missing}"


def test_import_check_finds_an_undeclared_package(dockerfile: Any) -> None:
    """Guards the test above: without tqdm in its requirements the trainer must fail it."""
    imports = third_party_imports(["training"])
    assert "tqdm" in imports and any(imports["tqdm"].values())
    assert "tqdm" in stage_requirements(dockerfile, "trainer")
    assert "tqdm" not in stage_requirements(dockerfile, "server")
    assert "torch" in stage_requirements(dockerfile, "server-gpu")
