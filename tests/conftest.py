"""Shared fixtures: small trained checkpoints, a model repository built by the real pipeline,
and servers started on copies of it.

torch is imported inside the fixtures, so test modules that never ask for them (most server
tests) do not pay for importing it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import grpc
    import tritonclient.grpc as triton
    from server_process import ServerGroup, ServerProcess

# Small synthetic splits: enough to learn the classes in one epoch, cheap to build on 2 cores.
FIXTURE_TRAIN_SIZE = 1000
FIXTURE_TEST_SIZE = 200
FIXTURE_MODELS = {"fashion_mlp": "fashion_mnist", "cifar10_cnn": "cifar10"}
# The gRPC transports a module marked `both_transports` runs every test on (server.api.transport).
GRPC_TRANSPORTS = ("grpcio", "native")
TRANSPORT_ENV = "SERVER_GRPC_TRANSPORT"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module marked `both_transports` runs once per gRPC transport, one after the other."""
    if metafunc.definition.get_closest_marker("both_transports") is not None:
        metafunc.parametrize("grpc_transport", GRPC_TRANSPORTS, indirect=True, scope="module")


@pytest.fixture(scope="module", autouse=True)
def grpc_transport(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The module's gRPC transport (None: the server's default, or the caller's
    SERVER_GRPC_TRANSPORT). Given to servers through the environment, so the servers a test
    starts itself follow it as those of `serve` do."""
    transport = getattr(request, "param", None)
    if transport is None:
        yield None
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TRANSPORT_ENV, transport)
        yield transport


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """arch -> training.train.TrainResult (checkpoints plus the synthetic data they saw)."""
    from training.train import train

    root = tmp_path_factory.mktemp("checkpoints")
    return {
        arch: train(
            arch,
            "synthetic",
            checkpoint_dir=root / arch,
            epochs=1,
            synthetic_train_size=FIXTURE_TRAIN_SIZE,
            synthetic_test_size=FIXTURE_TEST_SIZE,
            device="cpu",
            progress=False,
            log=lambda _line: None,
        )
        for arch in FIXTURE_MODELS
    }


@pytest.fixture(scope="session")
def trained_checkpoints(trained_runs: dict[str, Any]) -> dict[str, Path]:
    """arch -> best.pt for `fashion_mlp` and `cifar10_cnn` (1 epoch on synthetic data)."""
    return {arch: run.best for arch, run in trained_runs.items()}


@pytest.fixture(scope="session")
def model_repository(
    trained_runs: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A repository with `fashion_mnist` (ONNX), `fashion_mnist_ts` (the same checkpoint as
    TorchScript) and `cifar10` (ONNX), each at version 1. Shared: copy it before changing it."""
    from training.export import export_checkpoint

    repo = tmp_path_factory.mktemp("model_repository")
    quiet = {"log": lambda _line: None}
    fashion, cifar = trained_runs["fashion_mlp"], trained_runs["cifar10_cnn"]
    export_checkpoint(fashion.best, repo, "fashion_mnist", "onnx", data=fashion.data, **quiet)
    export_checkpoint(
        fashion.best, repo, "fashion_mnist_ts", "torchscript", data=fashion.data, **quiet
    )
    export_checkpoint(cifar.best, repo, "cifar10", "onnx", data=cifar.data, **quiet)
    return repo


@pytest.fixture
def writable_repository(model_repository: Path, tmp_path: Path) -> Path:
    """A private copy of `model_repository` that a test may change."""
    copy = tmp_path / "model_repository"
    shutil.copytree(model_repository, copy)
    return copy


@pytest.fixture(scope="session")
def _exiting_servers() -> Iterator[list[ServerGroup]]:
    """Servers signalled to stop at the end of their module, waited for at the end of the
    session: their exit overlaps the next modules' tests instead of adding to the run."""
    groups: list[ServerGroup] = []
    yield groups
    failures = []
    for group in groups:
        try:
            group.wait_all()
        except AssertionError as exc:  # the others are still waited for
            failures.append(exc)
    if failures:
        raise failures[0]


@pytest.fixture(scope="module")
def serve(
    model_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
    _exiting_servers: list[ServerGroup],
    grpc_transport: str | None,
) -> Iterator[Callable[..., ServerProcess]]:
    """Starts servers for one test module: `serve(*args, models=, prepare=, grace_period_s=)`
    (server_process.ServerGroup.start) runs `python -m server ARGS` on a private copy of
    `model_repository`. All get SIGTERM when the module ends (or its transport changes). A
    module names its server fixture `server` to get the `channel` and `triton_client` fixtures
    below."""
    from server_process import ServerGroup

    group = ServerGroup(model_repository, lambda: tmp_path_factory.mktemp("served"))
    _exiting_servers.append(group)
    yield group.start
    group.signal_all()


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    """A gRPC channel to the module's `server`."""
    import grpc

    with grpc.insecure_channel(server.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def triton_client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    """tritonclient's gRPC client on the module's `server`."""
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(server.target)
    yield client
    client.close()
