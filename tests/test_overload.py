"""Overload, hang-ups and deadlines against real servers serving a deliberately slow model
(tests/generated_models.py: 100 dense layers, tens of milliseconds per batch).

Timings are compared with each other (refusal vs accepted latency, before vs after the load),
never with absolute thresholds: the machine running the tests may be slow and shared.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from generated_models import SHAPE, write_slow_model
from server_process import ServerProcess, kserve_method, onnx_probabilities, set_batching

from modelrepo.layout import ONNX_FILE
from wire import grpc_service_pb2 as pb

pytestmark = pytest.mark.both_transports
MODEL = "slow"
QUEUE_SIZE = 8  # requests
BATCH = 16  # images
IMAGES = 4  # per request: a full queue is two batches
CLIENTS = 16
LOAD_S = 3.0


def _slow_model(repo: Path, delay_us: int) -> None:
    set_batching(
        write_slow_model(repo, MODEL, instances=1),
        max_batch_size=BATCH,
        max_queue_delay_us=delay_us,
    )


@pytest.fixture(scope="module")
def overloaded(serve: Callable[..., ServerProcess]) -> ServerProcess:
    return serve(
        "--max-queue-size", str(QUEUE_SIZE),
        models=["fashion_mnist"],
        prepare=lambda repo: _slow_model(repo, 2000),
    )  # fmt: skip


@pytest.fixture(scope="module")
def batching(serve: Callable[..., ServerProcess]) -> ServerProcess:
    """The slow model with a 30 ms window: requests sit queued, then in a long batch."""
    return serve(models=["fashion_mnist"], prepare=lambda repo: _slow_model(repo, 30_000))


def _request(
    images: np.ndarray, index: int, timeout_us: int = 0, n: int = 1
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL, id=str(index))
    request.inputs.add(name="input", datatype="FP32", shape=[n, *SHAPE])
    request.raw_input_contents.append(images[index : index + n].tobytes())
    if timeout_us:
        request.parameters["timeout"].int64_param = timeout_us
    return request


def _method(channel: grpc.aio.Channel) -> Any:
    return kserve_method(channel, "ModelInfer")


async def _idle_latency(infer: Any, images: np.ndarray, n: int = 5) -> float:
    """Median latency of `n` requests sent one at a time."""
    latencies = []
    for i in range(n):
        began = time.perf_counter()
        await infer(_request(images, i), timeout=30)
        latencies.append(time.perf_counter() - began)
    return statistics.median(latencies)


async def _overload(server: ServerProcess, images: np.ndarray) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(server.target) as channel:
        infer = _method(channel)
        before = await _idle_latency(infer, images)
        ok: list[tuple[float, int, pb.ModelInferResponse]] = []  # (latency, row, answer)
        refused: list[float] = []
        other: list[grpc.StatusCode] = []
        stop_at = time.perf_counter() + LOAD_S

        async def client(worker: int) -> None:
            index = worker
            while time.perf_counter() < stop_at:
                row = index % (len(images) - IMAGES)
                began = time.perf_counter()
                try:
                    answer = await infer(_request(images, row, n=IMAGES), timeout=30)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        refused.append(time.perf_counter() - began)
                        await asyncio.sleep(0.02)  # retries almost at once: no real back-off
                    else:
                        other.append(exc.code())
                else:
                    ok.append((time.perf_counter() - began, row, answer))
                index += CLIENTS

        await asyncio.gather(*(client(i) for i in range(CLIENTS)))
        after = await _idle_latency(infer, images)
    return {"before": before, "after": after, "ok": ok, "refused": refused, "other": other}


def test_overload_is_refused_fast_and_latency_stays_bounded(overloaded: ServerProcess) -> None:
    images = np.random.default_rng(0).random((64, *SHAPE), dtype=np.float32)
    expected = onnx_probabilities(overloaded.repository / MODEL / "1" / ONNX_FILE, images)
    result = asyncio.run(_overload(overloaded, images))
    ok, refused = result["ok"], result["refused"]
    assert not result["other"], result["other"][:5]
    assert len(ok) >= 10 and len(refused) >= 10, (len(ok), len(refused))
    for _, row, answer in ok:  # what was accepted was computed, for the right caller
        got = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(IMAGES, -1)
        np.testing.assert_allclose(got, expected[row : row + IMAGES], rtol=0, atol=1e-5)

    assert overloaded.metric("imgserve_compute_duration_seconds_count", model=MODEL) > 0
    # Two promises, with margins wide enough for a slow, shared machine. A refusal does not
    # wait for the queue: it comes back many times faster than an accepted request (which
    # waits for the batches queued ahead of it, several times one batch's compute).
    ok_latency = statistics.median(latency for latency, _, _ in ok)
    refusal = statistics.median(refused)
    assert refusal * 5 < ok_latency, (refusal, ok_latency)
    # Once the load is gone, an idle request is about as fast as before it: nothing is left
    # queued or slowed down.
    before, after = result["before"], result["after"]
    assert after < 5 * before, (before, after)
    assert overloaded.metric(
        "imgserve_requests_total", model=MODEL, code="RESOURCE_EXHAUSTED"
    ) == len(refused)
    assert overloaded.metric("imgserve_queue_depth", model=MODEL) == 0


# --- hang-ups and deadlines in the middle of batches ---

WAVE = 48


async def _hang_ups(server: ServerProcess, images: np.ndarray) -> dict[str, Any]:
    """Every third request hangs up after a random moment, every third has a short deadline
    (gRPC's, or Triton's `timeout` parameter), the rest wait for their answer."""
    rng = np.random.default_rng(1)
    outcomes: dict[int, object] = {}
    async with grpc.aio.insecure_channel(server.target) as channel:
        infer = _method(channel)

        async def one(index: int) -> None:
            kind = index % 6
            try:
                if kind in (0, 1):  # hang up after 0..150 ms: queued, batched or computing
                    call = infer(_request(images, index), timeout=30)
                    await asyncio.sleep(float(rng.uniform(0, 0.15)))
                    call.cancel()
                    outcomes[index] = await call
                elif kind == 2:
                    outcomes[index] = await infer(
                        _request(images, index), timeout=float(rng.uniform(0.01, 0.1))
                    )
                elif kind == 3:
                    timeout_us = int(rng.uniform(5_000, 60_000))
                    outcomes[index] = await infer(_request(images, index, timeout_us), timeout=30)
                else:
                    outcomes[index] = await infer(_request(images, index), timeout=30)
            except asyncio.CancelledError:
                outcomes[index] = grpc.StatusCode.CANCELLED
            except grpc.aio.AioRpcError as exc:
                outcomes[index] = exc.code()

        for wave in range(3):
            await asyncio.gather(*(one(wave * WAVE + i) for i in range(WAVE)))
        final = await infer(_request(images, 0), timeout=30)  # the loop still runs
    return {"outcomes": outcomes, "final": final}


def test_hang_ups_and_deadlines_mid_batch_never_misroute_answers(batching: ServerProcess) -> None:
    images = np.random.default_rng(2).random((3 * WAVE, *SHAPE), dtype=np.float32)
    expected = onnx_probabilities(batching.repository / MODEL / "1" / ONNX_FILE, images)
    result = asyncio.run(_hang_ups(batching, images))
    outcomes = result["outcomes"]
    assert len(outcomes) == 3 * WAVE
    codes: dict[str, int] = {}
    for index, outcome in outcomes.items():
        if isinstance(outcome, pb.ModelInferResponse):
            assert outcome.id == str(index)
            got = np.frombuffer(outcome.raw_output_contents[0], np.float32)
            np.testing.assert_allclose(got, expected[index], rtol=0, atol=1e-5)
            codes["OK"] = codes.get("OK", 0) + 1
        else:
            assert outcome in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED), (
                outcome
            )
            assert index % 6 in (0, 1, 2, 3), (index, outcome)  # only those that asked for it
            codes[outcome.name] = codes.get(outcome.name, 0) + 1
    assert codes.get("CANCELLED") and codes.get("DEADLINE_EXCEEDED"), codes
    final = np.frombuffer(result["final"].raw_output_contents[0], np.float32)
    np.testing.assert_allclose(final, expected[0], rtol=0, atol=1e-5)

    deadline = time.monotonic() + 10
    while batching.metric("imgserve_inflight_requests", model=MODEL) > 0:
        assert time.monotonic() < deadline, "requests still in flight"
        time.sleep(0.05)
    counted = {
        code: batching.metric("imgserve_requests_total", model=MODEL, code=code)
        for code in ("OK", "CANCELLED", "DEADLINE_EXCEEDED")
    }
    # The server counts what reached it: every answer the clients saw, and the hang-ups
    # (a client may hang up just as its answer leaves, so the server saw more OK).
    assert counted["OK"] >= codes["OK"] + 1, (counted, codes)
    assert counted["CANCELLED"] >= 1 and counted["DEADLINE_EXCEEDED"] >= 1, counted
    assert sum(counted.values()) <= 3 * WAVE + 1
    assert batching.metric("imgserve_requests_dropped_total", model=MODEL, reason="cancelled") >= 1
    assert batching.metric("imgserve_requests_dropped_total", model=MODEL, reason="deadline") >= 1
    assert batching.metric("imgserve_queue_depth", model=MODEL) == 0
    # Hang-ups and deadlines are the callers' doing: nothing logged as an error.
    assert " ERROR " not in batching.log and "Traceback" not in batching.log, batching.log
