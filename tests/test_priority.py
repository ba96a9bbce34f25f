"""Triton's schedule policy on a real server: high-priority requests overtake a queue kept full
of low-priority ones, over gRPC and HTTP alike, and a level's own queue bound and timeout hold.

The model is a deep generated network (about 15 ms per image here) with one instance and
batches of one image, so the queue's order is the order answers come back in.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
import tritonclient.http.aio as httpclient
from generated_models import SHAPE, write_slow_model
from server_process import ServerProcess
from tritonclient.utils import InferenceServerException

from modelrepo.config import load_config, write_config
from modelrepo.layout import CONFIG_FILE
from wire import model_config_pb2

pytestmark = pytest.mark.both_transports
MODEL = "slow"
LOW_CLIENTS = 12  # keeps about 12 x 15 ms of work queued ahead of any newcomer
HIGH_REQUESTS = 6  # per protocol, one after another
LEVEL_2_BOUND = 16


def _build(repo: Path) -> None:
    model_dir = write_slow_model(repo, MODEL, instances=1)
    config = load_config(model_dir / CONFIG_FILE)
    config.max_batch_size = 1
    batching = config.dynamic_batching
    batching.priority_levels = 2
    batching.default_priority_level = 2
    default = batching.default_queue_policy
    default.max_queue_size = LEVEL_2_BOUND
    default.allow_timeout_override = True
    batching.priority_queue_policy[1].allow_timeout_override = True
    batching.priority_queue_policy[1].timeout_action = model_config_pb2.ModelQueuePolicy.REJECT
    write_config(model_dir / CONFIG_FILE, config)


@pytest.fixture(scope="module")
def server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    return serve(models=["fashion_mnist"], prepare=_build)


def _image() -> np.ndarray:
    return np.random.default_rng(0).random((1, *SHAPE), dtype=np.float32)


def _grpc_input() -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("input", [1, *SHAPE], "FP32")
    tensor.set_data_from_numpy(_image())
    return tensor


def _http_input() -> httpclient.InferInput:
    tensor = httpclient.InferInput("input", [1, *SHAPE], "FP32")
    tensor.set_data_from_numpy(_image())
    return tensor


async def _load_and_overtake(server: ServerProcess) -> tuple[list[float], list[float]]:
    """(latencies of low-priority requests, of high-priority ones) under a full queue."""
    low: list[float] = []
    high: list[float] = []
    stop = asyncio.Event()
    clients = [grpcclient.InferenceServerClient(server.target) for _ in range(LOW_CLIENTS)]

    async def keep_queue_full(client: grpcclient.InferenceServerClient) -> None:
        while not stop.is_set():
            began = time.perf_counter()
            await client.infer(MODEL, [_grpc_input()])  # no priority: the default level, 2
            low.append(time.perf_counter() - began)

    async def overtake(infer: Callable[[], object]) -> None:
        for _ in range(HIGH_REQUESTS):
            began = time.perf_counter()
            await infer()  # type: ignore[misc]
            high.append(time.perf_counter() - began)

    grpc_high = grpcclient.InferenceServerClient(server.target)
    http_high = httpclient.InferenceServerClient(server.http_target)
    loaders = [asyncio.ensure_future(keep_queue_full(c)) for c in clients]
    try:
        await asyncio.sleep(1.0)  # the queue fills: every low client has a request waiting
        await asyncio.gather(
            overtake(lambda: grpc_high.infer(MODEL, [_grpc_input()], priority=1)),
            overtake(lambda: http_high.infer(MODEL, [_http_input()], priority=1)),
        )
    finally:
        stop.set()
        await asyncio.gather(*loaders)
        for client in (*clients, grpc_high, http_high):
            await client.close()
    return low, high


def test_high_priority_requests_overtake_a_full_queue_over_both_protocols(
    server: ServerProcess,
) -> None:
    low, high = asyncio.run(_load_and_overtake(server))
    assert len(high) == 2 * HIGH_REQUESTS and len(low) > 2 * LOW_CLIENTS
    low_median, high_median = statistics.median(low), statistics.median(high)
    # A low request waits for the whole queue (about 12 batches), a high one for the batch in
    # progress and at most the other protocol's high request: a few batches at most.
    assert high_median * 3 < low_median, (high_median, low_median)
    assert max(high) < low_median * 1.5, (sorted(high), low_median)
    stats = asyncio.run(_statistics(server))
    assert stats.inference_stats.success.count == len(low) + len(high)
    assert stats.inference_stats.queue.count == stats.inference_stats.compute_infer.count


async def _statistics(server: ServerProcess) -> object:
    async with grpcclient.InferenceServerClient(server.target) as client:
        return (await client.get_inference_statistics(MODEL)).model_stats[0]


def test_each_level_keeps_its_own_queue_bound_and_timeouts(server: ServerProcess) -> None:
    async def main() -> tuple[int, list[str], list[str]]:
        client = grpcclient.InferenceServerClient(server.target)
        http = httpclient.InferenceServerClient(server.http_target)
        try:
            flood = [
                asyncio.ensure_future(client.infer(MODEL, [_grpc_input()], priority=2))
                for _ in range(LEVEL_2_BOUND + 8)
            ]
            results = await asyncio.gather(*flood, return_exceptions=True)
            refused = [r.status() for r in results if isinstance(r, InferenceServerException)]
            # Level 1 has no bound of its own, and takes a 1 us timeout: rejected in the queue.
            blocker = asyncio.ensure_future(client.infer(MODEL, [_grpc_input()]))
            await asyncio.sleep(0.005)  # computing: the next ones wait
            timed_out = []
            for call in (
                lambda: client.infer(MODEL, [_grpc_input()], priority=1, timeout=1),
                lambda: http.infer(MODEL, [_http_input()], priority=1, timeout=1),
            ):
                try:
                    await call()
                except InferenceServerException as exc:
                    timed_out.append(str(exc.status()))
            await blocker
            return len(results) - len(refused), refused, timed_out
        finally:
            await client.close()
            await http.close()

    answered, refused, timed_out = asyncio.run(main())
    assert refused and set(refused) == {"StatusCode.RESOURCE_EXHAUSTED"}
    assert answered >= LEVEL_2_BOUND  # a place frees as each batch starts
    assert timed_out == ["StatusCode.DEADLINE_EXCEEDED", "504"]
