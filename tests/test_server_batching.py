"""Dynamic batching seen from outside: concurrent callers over gRPC, figures from /metrics."""

from __future__ import annotations

import asyncio
import queue
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from server_process import ServerProcess, onnx_probabilities, set_batching

pytestmark = pytest.mark.both_transports
SHAPE = (1, 28, 28)
CONCURRENT = 64


def _batch_window(repo: Path) -> None:
    # A 50 ms window: concurrent callers land in the same batches.
    set_batching(repo / "fashion_mnist", max_queue_delay_us=50_000, max_batch_size=64)


@pytest.fixture(scope="module")
def server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    return serve(models=["fashion_mnist"], prepare=_batch_window)


@pytest.fixture(scope="module")
def repository(server: ServerProcess) -> Path:
    return server.repository


def _expected(repository: Path, images: np.ndarray) -> np.ndarray:
    return onnx_probabilities(repository / "fashion_mnist" / "1" / "model.onnx", images)


def _batch_figures(server: ServerProcess) -> tuple[float, float]:
    """(batches formed, images in them) for fashion_mnist, from the batch-size histogram."""
    return (
        server.metric("imgserve_batch_size_count", model="fashion_mnist"),
        server.metric("imgserve_batch_size_sum", model="fashion_mnist"),
    )


async def _concurrent_single_image_requests(target: str, images: np.ndarray) -> list[np.ndarray]:
    async with triton_aio.InferenceServerClient(target) as client:

        async def one(index: int) -> np.ndarray:
            tensor = triton_aio.InferInput("input", [1, *SHAPE], "FP32")
            tensor.set_data_from_numpy(images[index : index + 1])
            result = await client.infer(
                "fashion_mnist", [tensor], request_id=str(index), client_timeout=30
            )
            assert result.get_response().id == str(index)
            return result.as_numpy("probabilities")[0]

        return await asyncio.gather(*(one(i) for i in range(len(images))))


def test_concurrent_requests_share_batches_and_get_their_own_rows(
    server: ServerProcess, repository: Path
) -> None:
    images = np.random.default_rng(0).random((CONCURRENT, *SHAPE), dtype=np.float32)
    batches, rows = _batch_figures(server)
    answered = server.metric("imgserve_requests_total", model="fashion_mnist", code="OK")

    rows_back = asyncio.run(_concurrent_single_image_requests(server.target, images))

    np.testing.assert_allclose(
        np.stack(rows_back), _expected(repository, images), rtol=0, atol=1e-6
    )
    after_batches, after_rows = _batch_figures(server)
    assert after_rows - rows == CONCURRENT
    # Fewer batches than requests: some batch held more than one caller's image.
    assert 1 <= after_batches - batches < CONCURRENT
    assert (
        server.metric("imgserve_requests_total", model="fashion_mnist", api="kserve", code="OK")
        == answered + CONCURRENT
    )
    assert server.metric("imgserve_inflight_requests", model="fashion_mnist") == 0


def test_one_stream_fills_batches(server: ServerProcess, repository: Path) -> None:
    """Requests on one ModelStreamInfer stream are answered concurrently, so they batch too."""
    images = np.random.default_rng(1).random((32, *SHAPE), dtype=np.float32)
    batches, rows = _batch_figures(server)
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    client = triton.InferenceServerClient(server.target)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(len(images)):
            tensor = triton.InferInput("input", [1, *SHAPE], "FP32")
            tensor.set_data_from_numpy(images[i : i + 1])
            client.async_stream_infer("fashion_mnist", [tensor], request_id=str(i))
        got = {}
        for _ in range(len(images)):
            result, error = answers.get(timeout=30)
            assert error is None, error
            got[int(result.get_response().id)] = result.as_numpy("probabilities")[0]
    finally:
        client.stop_stream()
        client.close()
    expected = _expected(repository, images)
    np.testing.assert_allclose(np.stack([got[i] for i in range(len(images))]), expected, atol=1e-6)
    after_batches, after_rows = _batch_figures(server)
    assert after_rows - rows == len(images)
    assert after_batches - batches < len(images)


def test_request_larger_than_max_batch_size_is_answered_whole(
    server: ServerProcess, repository: Path
) -> None:
    images = np.random.default_rng(2).random((150, *SHAPE), dtype=np.float32)
    batches, rows = _batch_figures(server)
    client = triton.InferenceServerClient(server.target)
    try:
        tensor = triton.InferInput("input", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        probabilities = client.infer("fashion_mnist", [tensor]).as_numpy("probabilities")
    finally:
        client.close()
    assert probabilities.shape == (150, 10)
    np.testing.assert_allclose(probabilities, _expected(repository, images), rtol=0, atol=1e-6)
    after_batches, after_rows = _batch_figures(server)
    assert after_rows - rows == 150
    assert after_batches - batches == 3  # 64 + 64 + 22: split, never refused


def test_each_models_ready_line_says_how_long_its_batches_wait(
    server: ServerProcess, serve: Callable[..., ServerProcess]
) -> None:
    """An operator reads from the log whether lone requests wait: a delay kept in config.pbtxt
    (here 50 ms) holds every batch, the default (no delay) only batches under load."""
    assert re.search(
        r"model fashion_mnist version 1 ready on cpu \(.*; every batch waits up to 50000 us "
        r"for companions, a lone request too",
        server.log,
    ), server.log
    default = serve("--batch-window-us", "1500", models=["fashion_mnist"])
    assert re.search(
        r"model fashion_mnist version 1 ready on cpu \(.*; a lone request runs at once, under "
        r"load a batch waits up to 1500 us\)",
        default.log,
    ), default.log
    adaptive = serve("--adaptive-batch-delay", models=["fashion_mnist"], prepare=_batch_window)
    assert re.search(
        r"ready on cpu \(.*; a lone request runs at once, under load a batch waits up to 50000 us",
        adaptive.log,
    ), adaptive.log
