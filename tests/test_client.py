"""The client library and its CLI against a real server subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from server_process import (
    PROJECT_ROOT,
    ServerProcess,
    onnx_probabilities,
)

from client import AsyncClassifierClient, ClassifierClient, ClientError
from modelrepo.layout import LABELS_FILE, ONNX_FILE, read_labels

pytestmark = pytest.mark.both_transports
MODEL = "fashion_mnist"
CLI_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def server(model_repository: Path, grpc_transport: str) -> Iterator[ServerProcess]:
    """One per transport (grpc_transport sets SERVER_GRPC_TRANSPORT for the process)."""
    with ServerProcess(model_repository) as process:
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[ClassifierClient]:
    with ClassifierClient(server.target, timeout=20.0) as c:
        yield c


@pytest.fixture(scope="module")
def pixels() -> dict[str, np.ndarray]:
    """Deterministic noise: a grayscale 28x28 image and an RGB 64x48 one (H x W x C)."""
    rng = np.random.default_rng(7)
    return {
        "gray.png": rng.integers(0, 256, (28, 28), dtype=np.uint8),
        "rgb.png": rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
    }


@pytest.fixture(scope="module")
def images(pixels: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("client_images")
    paths = []
    for name, array in pixels.items():
        path = folder / name
        Image.fromarray(array, "L" if array.ndim == 2 else "RGB").save(path)
        paths.append(path)
    return paths


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CLIENT_SERVER"}
    return subprocess.run(
        [sys.executable, "-m", "client", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


# --- library ---------------------------------------------------------------------------------


def test_classify_files(
    client: ClassifierClient, images: list[Path], model_repository: Path
) -> None:
    labels = read_labels(model_repository / MODEL / LABELS_FILE)
    results = client.classify(MODEL, images, top_k=3)

    assert len(results) == len(images)
    for result in results:
        assert (result.model, result.version) == (MODEL, "1")
        assert result.probabilities.shape == (len(labels),)
        assert result.probabilities.sum() == pytest.approx(1.0, abs=1e-4)
        assert len(result.top) == 3
        probabilities = [p.probability for p in result.top]
        assert probabilities == sorted(probabilities, reverse=True)
        assert result.top[0].index == int(np.argmax(result.probabilities))
        for prediction in result.top:
            assert prediction.label == labels[prediction.index]
            assert prediction.probability == pytest.approx(
                float(result.probabilities[prediction.index]), abs=1e-6
            )
    assert results[0].label == results[0].top[0].label


def test_arrays_match_png_pixels(
    client: ClassifierClient, images: list[Path], pixels: dict[str, np.ndarray]
) -> None:
    gray = pixels["gray.png"]
    from_file = client.classify(MODEL, images[0])[0].probabilities
    as_uint8 = client.classify(MODEL, gray[np.newaxis])[0].probabilities
    as_float = client.classify(MODEL, gray.astype(np.float32) / 255.0)[0].probabilities
    np.testing.assert_allclose(as_uint8, from_file, atol=1e-6)
    np.testing.assert_allclose(as_float, from_file, atol=1e-5)


def test_rgb_tensor_is_sent_channels_first(
    client: ClassifierClient, model_repository: Path
) -> None:
    """A C x H x W array reaches the model as it is: the server answers what onnxruntime does."""
    rng = np.random.default_rng(3)
    batch = rng.random((2, 3, 32, 32), dtype=np.float32)
    results = client.classify("cifar10", batch, top_k=2)
    expected = onnx_probabilities(model_repository / "cifar10" / "1" / ONNX_FILE, batch)
    got = np.stack([r.probabilities for r in results])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_stream_answers_every_batch(client: ClassifierClient, images: list[Path]) -> None:
    batches = [[images[0]], [images[1], images[0]], [b"not an image"], [images[1]]]
    outcomes = list(client.classify_stream(MODEL, iter(batches), top_k=2))

    assert sorted(o.batch for o in outcomes) == [0, 1, 2, 3]
    by_batch = {o.batch: o for o in outcomes}
    failed = by_batch[2]
    assert not failed.ok and failed.error is not None
    assert failed.error.code == "INVALID_ARGUMENT"
    for index in (0, 1, 3):
        outcome = by_batch[index]
        assert outcome.ok, outcome.error
        expected = client.classify(MODEL, batches[index], top_k=2)
        assert [r.top for r in outcome.results] == [r.top for r in expected]


def test_list_models(client: ClassifierClient, model_repository: Path) -> None:
    models = {m.name: m for m in client.list_models()}
    assert {"fashion_mnist", "fashion_mnist_ts", "cifar10"} <= set(models)
    fashion = models[MODEL]
    assert fashion.ready and fashion.version == "1" and fashion.reason == ""
    assert fashion.input_shape == (1, 28, 28) and fashion.precision == "fp32"
    assert list(fashion.labels) == read_labels(model_repository / MODEL / LABELS_FILE)
    assert models["cifar10"].input_shape == (3, 32, 32)


def test_errors_carry_code_and_readable_message(client: ClassifierClient) -> None:
    with pytest.raises(ClientError) as unknown:
        client.classify("no_such_model", np.zeros((1, 28, 28), np.float32))
    assert unknown.value.code == "NOT_FOUND"
    assert "no_such_model" in unknown.value.message

    target = f"127.0.0.1:{_closed_port()}"
    with ClassifierClient(target, timeout=5.0) as offline, pytest.raises(ClientError) as down:
        offline.list_models()
    assert down.value.code == "UNAVAILABLE"
    assert target in down.value.message and "ipv4" not in down.value.message
    assert down.value.details  # the raw gRPC text stays available for debugging


def test_invalid_address_is_not_reported_as_a_server_down() -> None:
    """gRPC says UNAVAILABLE for both; only the address can be fixed by the caller."""
    with ClassifierClient("bad::addr::", timeout=5.0) as client, pytest.raises(ClientError) as bad:
        client.list_models()
    assert bad.value.message.startswith("invalid server address 'bad::addr::'")
    assert "is it running" not in bad.value.message

    async def ask() -> None:
        async with AsyncClassifierClient("localhost:notaport", timeout=5.0) as aio:
            await aio.list_models()

    with pytest.raises(ClientError) as bad_port:
        asyncio.run(ask())
    assert "invalid server address 'localhost:notaport'" in bad_port.value.message
    assert "port" in bad_port.value.message


def test_async_client_matches_sync(
    client: ClassifierClient, server: ServerProcess, images: list[Path]
) -> None:
    async def ask() -> tuple[list, list]:
        async with AsyncClassifierClient(server.target, timeout=20.0) as aio:
            return await aio.classify(MODEL, images, top_k=3), await aio.list_models()

    results, models = asyncio.run(ask())
    expected = client.classify(MODEL, images, top_k=3)
    assert [r.top for r in results] == [r.top for r in expected]
    assert MODEL in {m.name for m in models}


# --- command line ----------------------------------------------------------------------------


def test_cli_classify_table(
    server: ServerProcess, client: ClassifierClient, images: list[Path]
) -> None:
    done = run_cli(
        "classify", "--server", server.target, "--model", MODEL, "--top-k", "3",
        *map(str, images),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    expected = client.classify(MODEL, images, top_k=3)
    lines = done.stdout.splitlines()
    for path, result in zip(images, expected, strict=True):
        assert str(path) in done.stdout
        for prediction in result.top:
            percent = f"{100 * prediction.probability:.2f}%"
            assert any(prediction.label in line and percent in line for line in lines)
    assert f"model {MODEL}, version 1" in done.stdout


def test_cli_classify_json(
    server: ServerProcess, client: ClassifierClient, images: list[Path]
) -> None:
    done = run_cli(
        "classify", "--server", server.target, "--model", MODEL, "--top-k", "2", "--json",
        *map(str, images),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert (answer["model"], answer["version"]) == (MODEL, "1")
    expected = client.classify(MODEL, images, top_k=2)
    assert [item["image"] for item in answer["results"]] == [str(p) for p in images]
    for item, result in zip(answer["results"], expected, strict=True):
        assert [p["label"] for p in item["top"]] == [p.label for p in result.top]
        assert sum(item["probabilities"]) == pytest.approx(1.0, abs=1e-4)


def test_cli_models(server: ServerProcess) -> None:
    done = run_cli("models", "--server", server.target)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:]}
    assert rows[MODEL][1:5] == ["1", "READY", "onnxruntime_onnx", "fp32"]
    assert "1x28x28" in rows[MODEL]

    listing = json.loads(run_cli("models", "--server", server.target, "--json").stdout)
    states = {m["name"]: (m["state"], m["precision"]) for m in listing["models"]}
    assert states[MODEL] == ("READY", "fp32")


@pytest.mark.parametrize(
    "case", ["unknown model", "missing file", "unreachable server", "invalid address"]
)
def test_cli_errors_are_one_line(
    case: str, server: ServerProcess, images: list[Path], tmp_path: Path
) -> None:
    target, model, image, mention = server.target, MODEL, str(images[0]), ""
    if case == "unknown model":
        model = mention = "no_such_model"
    elif case == "missing file":
        image = mention = str(tmp_path / "missing.png")
    elif case == "unreachable server":
        target = f"127.0.0.1:{_closed_port()}"
        mention = f"cannot reach the server at {target}"
    else:
        target, mention = "bad::addr::", "invalid server address 'bad::addr::'"
    done = run_cli("classify", "--server", target, "--model", model, "--timeout", "5", image)

    assert done.returncode != 0
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert mention in lines[0]


def _connections_to(port: int) -> int:
    """Established TCP connections on this machine whose far end is `port` (gRPC dials
    127.0.0.1 over IPv6 sockets, v4-mapped: both tables are read)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] == "01":  # 01: ESTABLISHED
                count += 1
    return count


@pytest.mark.parametrize("channels", [1, 6])
def test_channels_are_separate_connections(model_repository: Path, channels: int) -> None:
    """A server with workers serves a connection on one worker: more channels, more workers."""
    with ServerProcess(model_repository, "--workers", "2") as server:
        pixels = np.zeros((1, 28, 28), np.float32)
        with ClassifierClient(server.target, timeout=20.0, channels=channels) as client:
            for _ in range(2 * channels):
                assert client.classify(MODEL, pixels)[0].label
            assert _connections_to(server.grpc_port) == channels


def test_channels_must_be_positive(server: ServerProcess) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ClassifierClient(server.target, channels=0)
