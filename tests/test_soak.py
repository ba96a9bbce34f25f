"""Soak: a long mixed run against one server loses nothing and grows nothing.

Requests of 1..MAX_IMAGES images (some larger than max_batch_size, so they are split) over
both APIs, mixed with hang-ups, short deadlines and bad requests. Every answer is checked
against the model run directly; every failure must be the one its request asked for. The
run pauses three times (after a warm-up, halfway, at the end); at each pause the server's
RSS, open file descriptors and event-loop tasks are sampled, and the second half must not
grow them more than noise allows (a leak grows both halves alike; warm-up only the first).

`test_soak_short` (10 000 requests, about 10 s) runs with the suite; `test_soak_long`
(100 000, a few minutes on 2 cores) only on demand: `pytest -m slow tests/test_soak.py`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from server_process import (
    ServerProcess,
    classifier_method,
    kserve_method,
    onnx_probabilities,
    rss_bytes,
    set_batching,
)

from modelrepo.layout import ONNX_FILE
from server.observability.metrics import EVENT_LOOP_SAMPLE_S
from wire import classifier_pb2
from wire import grpc_service_pb2 as pb

MODEL = "fashion_mnist"
SHAPE = (1, 28, 28)
MAX_BATCH = 16
MAX_IMAGES = 24  # past MAX_BATCH: split into two queue items and answered whole
CONCURRENCY = 16
POOL = 512  # distinct images; a request takes a random selection of them
# Allowed growth of RSS over the second half: allocator noise plus a little per request.
RSS_SLACK_BYTES = 16 * 1024 * 1024
RSS_PER_REQUEST_BYTES = 200


@pytest.fixture(scope="module")
def server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    return serve(
        models=[MODEL],
        prepare=lambda repo: set_batching(
            repo / MODEL, max_batch_size=MAX_BATCH, max_queue_delay_us=1000
        ),
    )


@dataclass
class Sample:
    rss: int
    fds: int
    tasks: float


@dataclass
class Tally:
    client: Counter[str] = field(default_factory=Counter)  # kind:code
    checked: int = 0


def _sample(server: ServerProcess) -> Sample:
    assert server.process is not None
    fds = len(os.listdir(f"/proc/{server.process.pid}/fd"))
    return Sample(rss_bytes(server), fds, _event_loop_tasks(server))


def _event_loop_tasks(server: ServerProcess) -> float:
    """The task gauge, scraped again while it is missing (a loop too busy to count in time
    leaves it out of that scrape): a missing sample must not read as 0 and hide a leak."""
    for _ in range(20):
        samples = server.metrics()
        tasks = samples.get(("imgserve_event_loop_tasks", ()))
        if tasks is not None:
            assert tasks > 0  # at least the batch loop and the server's own tasks
            return tasks
        time.sleep(0.1)
    raise AssertionError("imgserve_event_loop_tasks missing from 20 scrapes in a row")


def _wait_idle(server: ServerProcess) -> None:
    deadline = time.monotonic() + 30
    while server.metric("imgserve_inflight_requests") > 0:
        assert time.monotonic() < deadline, "requests still in flight after the phase ended"
        time.sleep(0.05)
    # The task gauge is sampled every EVENT_LOOP_SAMPLE_S: the value scraped now may date from
    # before the last requests ended. Two periods on, it was sampled while idle.
    time.sleep(2 * EVENT_LOOP_SAMPLE_S)


def _kserve(pixels: np.ndarray, model: str = MODEL) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes())
    return request


def _native(pixels: np.ndarray, model: str = MODEL) -> classifier_pb2.ClassifyRequest:
    return classifier_pb2.ClassifyRequest(
        model=model,
        images=[
            classifier_pb2.Image(
                tensor=classifier_pb2.Tensor(shape=list(SHAPE), datatype="FP32", data=p.tobytes())
            )
            for p in pixels
        ],
    )


class Soak:
    def __init__(self, channel: grpc.aio.Channel, images: np.ndarray, expected: np.ndarray):
        self.images, self.expected = images, expected
        self.infer = kserve_method(channel, "ModelInfer")
        self.classify = classifier_method(channel, "Classify")
        self.tally = Tally()

    async def run(self, first: int, count: int) -> None:
        """Requests first..first+count-1, CONCURRENCY at a time."""
        queue = iter(range(first, first + count))

        async def worker() -> None:
            for index in queue:
                await self.one(index)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))

    async def one(self, index: int) -> None:
        rng = np.random.default_rng(index)
        n = int(rng.integers(1, MAX_IMAGES + 1))
        rows = rng.integers(0, POOL, n)
        pixels = self.images[rows]
        native = bool(index % 2)
        roll = int(rng.integers(0, 20))
        kind = (
            "ok"
            if roll < 14
            else ("cancel", "cancel", "deadline", "deadline", "bad", "gone")[roll - 14]
        )
        if kind == "bad":
            pixels = pixels[:, :, :, :27].copy()  # wrong width
        model = "no_such_model" if kind == "gone" else MODEL
        timeout = float(rng.uniform(0.001, 0.01)) if kind == "deadline" else 30.0
        if native:
            call = self.classify(_native(pixels, model), timeout=timeout)
        else:
            call = self.infer(_kserve(pixels, model), timeout=timeout)
        try:
            if kind == "cancel":
                await asyncio.sleep(float(rng.uniform(0, 0.005)))
                call.cancel()
            answer = await call
        except asyncio.CancelledError:
            code = "CANCELLED"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        else:
            code = "OK"
            if native:
                got = np.array([r.probabilities for r in answer.results], np.float32)
            else:
                got = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(n, -1)
            np.testing.assert_allclose(got, self.expected[rows], rtol=0, atol=1e-5)
            self.tally.checked += 1
        allowed = {
            "ok": {"OK"},
            "cancel": {"OK", "CANCELLED"},
            "deadline": {"OK", "DEADLINE_EXCEEDED"},
            "bad": {"INVALID_ARGUMENT"},
            "gone": {"NOT_FOUND"},
        }[kind]
        assert code in allowed, (index, kind, code)
        self.tally.client[f"{kind}:{code}"] += 1


async def _soak(server: ServerProcess, total: int) -> tuple[Tally, list[Sample]]:
    images = np.random.default_rng(0).random((POOL, *SHAPE), dtype=np.float32)
    expected = onnx_probabilities(server.repository / MODEL / "1" / ONNX_FILE, images)
    warm_up = total // 5
    half = (total - warm_up) // 2
    samples = []
    async with grpc.aio.insecure_channel(server.target) as channel:
        soak = Soak(channel, images, expected)
        start = 0
        for count in (warm_up, half, total - warm_up - half):
            await soak.run(start, count)
            start += count
            await asyncio.to_thread(_wait_idle, server)
            samples.append(await asyncio.to_thread(_sample, server))
    return soak.tally, samples


def _check(server: ServerProcess, total: int) -> None:
    before = {
        code: server.metric("imgserve_requests_total", code=code)
        for code in ("INVALID_ARGUMENT", "NOT_FOUND")
    }
    tally, (warm, middle, end) = asyncio.run(_soak(server, total))
    client = tally.client
    assert sum(client.values()) == total  # every request has an outcome
    assert tally.checked == sum(v for k, v in client.items() if k.endswith(":OK"))
    assert (
        client["ok:OK"] >= total // 2
        and client["cancel:CANCELLED"]
        and client["bad:INVALID_ARGUMENT"]
    )
    # Bad requests always reach the server: it counted each, by its code.
    assert (
        server.metric("imgserve_requests_total", code="INVALID_ARGUMENT")
        - before["INVALID_ARGUMENT"]
        == client["bad:INVALID_ARGUMENT"]
    )
    assert (
        server.metric("imgserve_requests_total", code="NOT_FOUND") - before["NOT_FOUND"]
        == client["gone:NOT_FOUND"]
    )
    assert server.metric("imgserve_requests_total", code="OK") >= tally.checked
    assert server.metric("imgserve_queue_depth", model=MODEL) == 0
    # Hang-ups, deadlines and bad requests are the clients' doing: no error, no traceback.
    assert " ERROR " not in server.log and "Traceback" not in server.log, server.log[-5000:]
    second_half = total - total // 5 - (total - total // 5) // 2
    slack = RSS_SLACK_BYTES + RSS_PER_REQUEST_BYTES * second_half
    assert end.rss - middle.rss <= slack, (warm, middle, end)
    assert end.rss - warm.rss <= 2 * slack, (warm, middle, end)
    assert end.fds <= warm.fds + 4, (warm, middle, end)
    assert end.tasks <= warm.tasks + 4, (warm, middle, end)


def test_soak_short(server: ServerProcess) -> None:
    _check(server, 10_000)


@pytest.mark.slow
def test_soak_long(server: ServerProcess) -> None:
    _check(server, 100_000)
