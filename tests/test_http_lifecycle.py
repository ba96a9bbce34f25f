"""The HTTP/REST port's lifecycle: live before the models load, drained on SIGTERM like gRPC
(requests in flight answered, new ones refused with 503, exit 0 within the grace period),
and absent with --disable-http."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from server_process import ServerProcess, copy_repository, set_batching

from server.api.status import REQUEST_ID_KEY

SHAPE = (1, 28, 28)
GRACE_S = 5.0
WAVE = 40


@pytest.fixture(scope="module")
def repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = copy_repository(
        model_repository, tmp_path_factory.mktemp("http-drain") / "repository", ["fashion_mnist"]
    )
    # Requests wait up to 1 s in the queue: a signal is sure to find some in flight.
    set_batching(repo / "fashion_mnist", max_queue_delay_us=1_000_000, max_batch_size=256)
    return repo


def _body(index: int) -> dict[str, object]:
    image = np.random.default_rng(index).random((1, *SHAPE), dtype=np.float32)
    return {
        "id": str(index),
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, *SHAPE],
             "data": image.ravel().tolist()}
        ],
    }  # fmt: skip


async def _drain(server: ServerProcess) -> tuple[list[object], list[object], float]:
    """(answers of the wave in flight at the signal, answers after it, seconds to exit)."""
    url = f"{server.http_url}/v2/models/fashion_mnist/infer"

    async def call(session: aiohttp.ClientSession, index: int) -> object:
        try:
            async with session.post(url, json=_body(index)) as answer:
                document = await answer.json()
                return answer.status if answer.status != 200 else document["id"]
        except aiohttp.ClientError as exc:
            return type(exc).__name__

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        first = [asyncio.create_task(call(session, i)) for i in range(WAVE)]
        deadline = time.monotonic() + 20
        while server.metric("imgserve_queue_depth", model="fashion_mnist") < WAVE:
            assert time.monotonic() < deadline, "the wave never queued"
            await asyncio.sleep(0.02)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.05)  # draining: new calls are refused for a moment, then closed
        second = [asyncio.create_task(call(session, WAVE + i)) for i in range(5)]
        answers = await asyncio.gather(*first)
        later = await asyncio.gather(*second)
    status = await asyncio.to_thread(server.wait, 30)
    assert status == 0, server.log
    return answers, later, time.monotonic() - signalled


def test_sigterm_answers_http_requests_in_flight_and_refuses_new_ones(repository: Path) -> None:
    server = ServerProcess(repository, grace_period_s=GRACE_S).start()
    try:
        answers, later, took = asyncio.run(_drain(server))
    finally:
        server.kill()
    assert answers == [str(i) for i in range(WAVE)]  # every accepted request answered
    # After the signal: 503 while the port still takes calls, then no connection at all.
    assert all(answer in (503, "ClientConnectorError") for answer in later), later
    assert took < GRACE_S + 3


def test_liveness_answers_before_the_models_are_loaded(
    model_repository: Path, tmp_path: Path
) -> None:
    repo = copy_repository(model_repository, tmp_path / "repository", ["fashion_mnist_ts"])
    server = ServerProcess(repo, until_started=False).start()  # TorchScript: a slow load
    try:
        answers = []
        while not answers or answers[-1][1] != 200:
            live = _get(server, "/v2/health/live")
            ready = _get(server, "/v2/health/ready")
            answers.append((live[0], ready[0]))
            assert live == (200, {"live": True})
            time.sleep(0.05)
        assert answers[0] == (200, 400)  # live at once, ready once the model is loaded
    finally:
        server.stop()


def _get(server: ServerProcess, path: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(server.http_url + path, timeout=10) as answer:
            assert answer.headers[REQUEST_ID_KEY]
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_disable_http_binds_no_http_port(model_repository: Path, tmp_path: Path) -> None:
    repo = copy_repository(model_repository, tmp_path / "repository", ["fashion_mnist"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ServerProcess(repo, "--disable-http", "--http-port", str(port)).start()
    try:
        assert server.http_port == 0 and " rest off;" in server.log
        assert "over HTTP/REST" not in server.log  # the startup hint names no HTTP URL
        assert "gRPC port security" in server.log
        with socket.socket() as client:
            assert client.connect_ex(("127.0.0.1", port)) != 0  # nobody listens there
    finally:
        server.stop()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_startup_hint_names_an_http_url_that_answers(
    model_repository: Path, tmp_path: Path, workers: str
) -> None:
    """The startup line's curl example, as printed, reaches the model's metadata."""
    repo = copy_repository(model_repository, tmp_path / "repository", ["fashion_mnist"])
    server = ServerProcess(repo, "--workers", workers).start()
    try:
        hint = re.search(r"over HTTP/REST \(curl (\S+)\)", server.log)
        assert hint is not None, server.log
        assert hint[1] == f"http://127.0.0.1:{server.http_port}/v2/models/fashion_mnist"
        with urllib.request.urlopen(hint[1], timeout=10) as answer:
            assert json.load(answer)["name"] == "fashion_mnist"
    finally:
        server.stop()
