"""The dynamic batcher on a real ONNX Runtime session of the fixture repository's MLP."""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelrepo.layout import ONNX_FILE, PLATFORM_ONNX
from server.core.batcher import Batcher, BatchError
from server.core.modelstats import Timing
from server.core.queues import QueuePolicy, SchedulePolicy
from server.errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelUnavailableError,
    QueueFullError,
)
from server.observability.metrics import Metrics
from server.runtimes import Runtime, create_runtime
from server.runtimes.base import Tensors

MODEL, VERSION = "fashion_mnist", "1"
LABELS = {"model": MODEL, "version": VERSION}
SHAPE = (1, 28, 28)
MARKER = 7.0  # a pixel value no real image has: batches holding it fail in FailingOnMarker


async def submit(batcher: Batcher, images: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
    """The seed model's images in, its probabilities out."""
    return (await batcher.submit({"input": images}, *args, **kwargs))["probabilities"]


def run(runtime: Runtime, images: np.ndarray) -> np.ndarray:
    return runtime.run({"input": images})["probabilities"]


@pytest.fixture(scope="module")
def runtime(model_repository: Path) -> Iterator[Runtime]:
    runtime = create_runtime(PLATFORM_ONNX, model_repository / MODEL / "1" / ONNX_FILE, "cpu", 1)
    yield runtime
    runtime.close()


class FailingOnMarker:
    """A real runtime that raises for any batch containing the marker pixel value."""

    def __init__(self, inner: Runtime) -> None:
        self.inner = inner
        self.device = inner.device
        self.calls: list[int] = []

    def run(self, batch: Tensors) -> dict[str, np.ndarray]:
        self.calls.append(batch["input"].shape[0])
        if (batch["input"] == MARKER).any():
            raise ValueError("marker in batch")
        return self.inner.run(batch)

    def close(self) -> None:
        pass


class Slow:
    """A real runtime that takes at least `seconds` per batch, to make instances overlap."""

    def __init__(self, inner: Runtime, seconds: float) -> None:
        self.inner, self.seconds, self.device = inner, seconds, inner.device
        self.batches = 0

    def run(self, batch: Tensors) -> dict[str, np.ndarray]:
        self.batches += 1
        time.sleep(self.seconds)
        return self.inner.run(batch)

    def close(self) -> None:
        pass


def make_batcher(
    runtimes: Runtime | list[Runtime],
    metrics: Metrics,
    *,
    max_batch_size: int = 64,
    delay_s: float = 0.005,
    max_queue_size: int = 1024,
    schedule: SchedulePolicy | None = None,
    load_window_s: float = 0.0,
) -> Batcher:
    batcher = Batcher(
        runtimes if isinstance(runtimes, list) else [runtimes],
        model=MODEL,
        version=VERSION,
        max_batch_size=max_batch_size,
        max_queue_delay_s=delay_s,
        max_queue_size=max_queue_size,
        metrics=metrics,
        schedule=schedule,
        load_window_s=load_window_s,
    )
    batcher.start()
    return batcher


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


def sample(metrics: Metrics, name: str, **extra: str) -> float:
    value = metrics.registry.get_sample_value(f"imgserve_{name}", {**LABELS, **extra})
    return 0.0 if value is None else value


def test_concurrent_single_images_form_batches_and_each_caller_gets_its_row(
    runtime: Runtime,
) -> None:
    metrics = Metrics()
    x = images(64)

    async def main() -> list[np.ndarray]:
        batcher = make_batcher(runtime, metrics, delay_s=0.05)
        outputs = await asyncio.gather(*(submit(batcher, x[i : i + 1]) for i in range(64)))
        await batcher.close()
        return outputs

    outputs = asyncio.run(main())
    batches = sample(metrics, "batch_size_count")
    assert sample(metrics, "batch_size_sum") == 64
    assert 1 <= batches < 64  # batching happened: fewer batches than requests
    assert sample(metrics, "batches_total", outcome="success") == batches
    assert sample(metrics, "inferences_total") == 64
    assert sample(metrics, "queue_duration_seconds_count") == 64
    assert sample(metrics, "compute_duration_seconds_count") == batches
    assert sample(metrics, "queue_depth") == 0
    for i, out in enumerate(outputs):
        assert out.shape == (1, 10)
        np.testing.assert_allclose(out, run(runtime, x[i : i + 1]), rtol=0, atol=1e-6)


def test_full_batch_closes_without_waiting_for_the_delay(runtime: Runtime) -> None:
    metrics = Metrics()

    async def main() -> tuple[float, float]:
        batcher = make_batcher(runtime, metrics, max_batch_size=4, delay_s=30.0)
        began = time.monotonic()
        await asyncio.gather(*(submit(batcher, images(1, i)) for i in range(4)))
        full = time.monotonic() - began
        short = make_batcher(runtime, metrics, max_batch_size=4, delay_s=0.05)
        began = time.monotonic()
        await submit(short, images(1))
        alone = time.monotonic() - began
        await asyncio.gather(batcher.close(), short.close())
        return full, alone

    full, alone = asyncio.run(main())
    assert full < 10.0  # a 30 s delay was not waited out: four rows filled the batch
    assert alone >= 0.045  # a lone request waits out its batch's delay


def test_oversize_request_is_split_and_answered_whole_in_order(runtime: Runtime) -> None:
    metrics = Metrics()
    x = images(150, seed=1)

    async def main() -> np.ndarray:
        batcher = make_batcher(runtime, metrics, max_batch_size=64)
        out = await submit(batcher, x)
        await batcher.close()
        return out

    out = asyncio.run(main())
    assert out.shape == (150, 10)
    np.testing.assert_allclose(out, run(runtime, x), rtol=0, atol=1e-6)
    assert sample(metrics, "batch_size_sum") == 150
    assert sample(metrics, "batch_size_count") == 3
    assert sample(metrics, "batch_size_bucket", le="64.0") == 3  # no batch over 64 rows


def test_expired_deadlines_are_dropped_before_compute(runtime: Runtime) -> None:
    metrics = Metrics()
    spy = FailingOnMarker(runtime)

    async def main() -> np.ndarray:
        batcher = make_batcher(spy, metrics, delay_s=0.2)
        with pytest.raises(DeadlineExceededError):
            await submit(batcher, images(1), deadline=time.monotonic() - 1.0)
        # Passes while queued: the batch closes after 0.2 s, the deadline is at 0.02 s.
        expiring = asyncio.ensure_future(submit(batcher, images(1), time.monotonic() + 0.02))
        living = asyncio.ensure_future(submit(batcher, images(2), time.monotonic() + 30.0))
        with pytest.raises(DeadlineExceededError):
            await expiring
        out = await living
        await batcher.close()
        return out

    out = asyncio.run(main())
    assert out.shape == (2, 10)
    assert sample(metrics, "requests_dropped_total", reason="deadline") == 2
    assert spy.calls == [2]  # only the living request reached the runtime


def test_full_queue_refuses_at_once_and_close_finishes_accepted_work(runtime: Runtime) -> None:
    metrics = Metrics()

    async def main() -> list[np.ndarray]:
        batcher = make_batcher(runtime, metrics, max_queue_size=2, delay_s=30.0)
        accepted = [asyncio.ensure_future(submit(batcher, images(1, i))) for i in range(2)]
        await asyncio.sleep(0)  # both enqueued
        assert batcher.queue_depth == 2
        assert sample(metrics, "queue_depth") == 2
        began = time.monotonic()
        with pytest.raises(QueueFullError, match="queue full"):
            await submit(batcher, images(1, 9))
        assert time.monotonic() - began < 1.0
        with pytest.raises(QueueFullError):  # all chunks of a request fit, or none is queued
            await submit(batcher, images(100))  # two chunks: room for them once the queue drains
        await batcher.close()  # does not wait out the 30 s delay, and answers both
        assert all(task.done() for task in accepted)
        with pytest.raises(ModelUnavailableError):
            await submit(batcher, images(1))
        return [task.result() for task in accepted]

    results = asyncio.run(main())
    for i, out in enumerate(results):
        np.testing.assert_allclose(out, run(runtime, images(1, i)), rtol=0, atol=1e-6)


def test_request_larger_than_the_whole_queue_is_invalid_not_retryable(runtime: Runtime) -> None:
    metrics = Metrics()

    async def main() -> np.ndarray:
        # Room for 2 chunks of 64 rows: 128 images per request at most, whatever the load.
        batcher = make_batcher(runtime, metrics, max_queue_size=2, delay_s=0.01)
        with pytest.raises(InvalidInputError) as raised:
            await submit(batcher, images(129))
        assert str(raised.value) == (
            "request of 129 images is too large for this server's queue: model "
            "'fashion_mnist' version 1 takes at most 128 images per request"
        )
        assert batcher.queue_depth == 0
        out = await submit(batcher, images(128, seed=3))  # the largest request that fits
        await batcher.close()
        return out

    out = asyncio.run(main())
    assert out.shape == (128, 10)
    np.testing.assert_allclose(out, run(runtime, images(128, seed=3)), rtol=0, atol=1e-6)


def test_cancelled_caller_is_dropped_and_the_loop_goes_on(runtime: Runtime) -> None:
    metrics = Metrics()
    spy = FailingOnMarker(runtime)

    async def main() -> tuple[np.ndarray, np.ndarray]:
        batcher = make_batcher(spy, metrics, delay_s=0.05)
        gone = asyncio.ensure_future(submit(batcher, images(3)))
        split = asyncio.ensure_future(submit(batcher, images(100)))  # two queue items
        kept = asyncio.ensure_future(submit(batcher, images(1, 5)))
        await asyncio.sleep(0)
        gone.cancel()
        split.cancel()
        first = await kept
        second = await submit(batcher, images(2, 6))
        assert gone.cancelled() and split.cancelled()
        await batcher.close()
        return first, second

    first, second = asyncio.run(main())
    assert first.shape == (1, 10) and second.shape == (2, 10)
    assert sample(metrics, "requests_dropped_total", reason="cancelled") == 3
    assert spy.calls == [1, 2]  # the cancelled rows never reached the runtime


def test_cancelled_caller_frees_its_queue_slot_at_once(runtime: Runtime) -> None:
    metrics = Metrics()

    async def main() -> np.ndarray:
        batcher = make_batcher(runtime, metrics, delay_s=30.0, max_queue_size=1)
        gone = asyncio.ensure_future(submit(batcher, images(1)))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await submit(batcher, images(1))
        gone.cancel()
        await asyncio.sleep(0)  # the done-callback runs: the slot is free, no 30 s wait
        assert batcher.queue_depth == 0
        kept = asyncio.ensure_future(submit(batcher, images(1, 4)))
        await asyncio.sleep(0)
        await batcher.close()  # flushes the kept request without waiting out the delay
        return await kept

    out = asyncio.run(main())
    np.testing.assert_allclose(out, run(runtime, images(1, 4)), rtol=0, atol=1e-6)
    assert sample(metrics, "requests_dropped_total", reason="cancelled") == 1


def test_failing_batch_fails_only_its_own_requests(runtime: Runtime) -> None:
    metrics = Metrics()
    spy = FailingOnMarker(runtime)
    poisoned = images(2)
    poisoned[1, 0, 0, 0] = MARKER

    async def main() -> list[object]:
        batcher = make_batcher(spy, metrics, delay_s=0.05)
        first = await asyncio.gather(
            submit(batcher, images(1, 1)),
            submit(batcher, poisoned),
            submit(batcher, images(3, 2)),
            return_exceptions=True,
        )
        after = await submit(batcher, images(4, 3))
        await batcher.close()
        return [*first, after]

    *first, after = asyncio.run(main())
    assert spy.calls == [6, 4]
    assert all(isinstance(r, ValueError) and str(r) == "marker in batch" for r in first)
    assert isinstance(after, np.ndarray) and after.shape == (4, 10)
    assert sample(metrics, "batches_total", outcome="failure") == 1
    assert sample(metrics, "batches_total", outcome="success") == 1
    assert sample(metrics, "inferences_total") == 4


def _one_row_model(path: Path) -> Path:
    """A valid ONNX graph that always answers one row, whatever the batch: a broken export."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, values: list[int]) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(values, np.int64), name)

    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("Slice", ["flat", "start", "end", "axes"], ["cut"]),
            helper.make_node("Softmax", ["cut"], ["probabilities"], axis=1),
        ],
        "one_row",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *SHAPE])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 10])],
        initializer=[const("start", [0, 0]), const("end", [1, 10]), const("axes", [0, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_batch_with_wrong_row_count_fails_and_the_next_batch_succeeds(tmp_path: Path) -> None:
    broken = create_runtime(PLATFORM_ONNX, _one_row_model(tmp_path / ONNX_FILE), "cpu", 1)
    metrics = Metrics()

    async def main() -> tuple[list[object], np.ndarray]:
        batcher = make_batcher(broken, metrics, delay_s=0.05)
        pair = await asyncio.gather(
            submit(batcher, images(1, 1)), submit(batcher, images(1, 2)), return_exceptions=True
        )
        alone = await submit(batcher, images(1, 3))  # one row in, one row out: fine
        await batcher.close()
        return pair, alone

    pair, alone = asyncio.run(main())
    for result in pair:
        assert isinstance(result, BatchError)
        assert str(result) == "runtime returned 1 rows of 'probabilities' for a batch of 2"
    assert alone.shape == (1, 10)
    assert sample(metrics, "batches_total", outcome="failure") == 1
    broken.close()


def test_instances_share_one_queue_and_run_side_by_side(runtime: Runtime) -> None:
    metrics = Metrics()
    instances = [Slow(runtime, 0.1), Slow(runtime, 0.1)]

    async def main() -> list[np.ndarray]:
        batcher = make_batcher(list(instances), metrics, max_batch_size=2, delay_s=0.001)
        x = images(4)
        out = await asyncio.gather(*(submit(batcher, x[i : i + 1]) for i in range(4)))
        await batcher.close()
        return out

    outputs = asyncio.run(main())
    assert len(outputs) == 4
    assert [s.batches for s in instances] == [1, 1]  # one batch of two rows on each instance


class CountingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The event loop's selector, counting its waits: each is one wake-up of the loop."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def select(self, timeout: float | None = None) -> list:
        self.waits += 1
        return super().select(timeout)


def test_idle_batcher_does_not_poll(runtime: Runtime) -> None:
    """An idle batcher never wakes the event loop: its loops sleep until a request or a timer."""
    metrics = Metrics()
    selector = CountingSelector()

    async def wake_ups(seconds: float) -> int:
        before = selector.waits
        await asyncio.sleep(seconds)
        return selector.waits - before

    async def poll(period: float) -> None:
        while True:
            await asyncio.sleep(period)

    async def main() -> tuple[int, int]:
        # Two instance loops with a 0.1 ms window, both idle once the request is answered.
        batcher = make_batcher([runtime, runtime], metrics, delay_s=0.0001)
        await submit(batcher, images(1))
        idle = await wake_ups(0.5)
        poller = asyncio.ensure_future(poll(0.01))  # what a 10 ms poller would cost
        polled = await wake_ups(0.5)
        poller.cancel()
        await batcher.close()
        return idle, polled

    loop = asyncio.SelectorEventLoop(selector)
    try:
        idle, polled = loop.run_until_complete(main())
    finally:
        loop.close()
    assert polled >= 20  # the count sees polling (about 100 wake-ups when idle otherwise)
    assert idle <= 5, idle  # the sleep's own timer (2 wake-ups); a 100 ms poller would be 10


def test_high_priority_requests_overtake_queued_low_priority_ones(runtime: Runtime) -> None:
    """One instance, one image per batch, 30 ms per batch: the order answers come back in is
    the order the queue hands them out."""
    metrics = Metrics()
    slow = Slow(runtime, 0.03)
    schedule = SchedulePolicy(levels=2, default_level=2)

    async def main() -> list[str]:
        batcher = make_batcher(slow, metrics, max_batch_size=1, delay_s=0.0, schedule=schedule)
        done: list[str] = []

        async def ask(name: str, priority: int) -> None:
            await submit(batcher, images(1), priority=priority)
            done.append(name)

        low = [asyncio.ensure_future(ask(f"low{i}", 0)) for i in range(5)]
        await asyncio.sleep(0.01)  # low0 is computing, low1..4 wait
        high = [asyncio.ensure_future(ask(f"high{i}", 1)) for i in range(2)]
        await asyncio.gather(*low, *high)
        await batcher.close()
        return done

    done = asyncio.run(main())
    assert done == ["low0", "high0", "high1", "low1", "low2", "low3", "low4"]


def test_a_full_priority_level_refuses_while_others_still_take_requests(runtime: Runtime) -> None:
    metrics = Metrics()
    schedule = SchedulePolicy(levels=2, default_level=2, default=QueuePolicy(max_queue_size=1))

    async def main() -> None:
        batcher = make_batcher(runtime, metrics, delay_s=30.0, schedule=schedule)
        queued = [asyncio.ensure_future(submit(batcher, images(1), priority=p)) for p in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="priority level 2"):
            await submit(batcher, images(1), priority=2)
        with pytest.raises(InvalidInputError, match="at most 64 images"):
            await submit(batcher, images(65), priority=2)  # two chunks never fit level 2
        await batcher.close()
        await asyncio.gather(*queued)

    asyncio.run(main())


def test_a_timeout_passing_in_the_queue_rejects_the_request(runtime: Runtime) -> None:
    metrics = Metrics()
    slow = Slow(runtime, 0.1)

    async def main() -> None:
        batcher = make_batcher(slow, metrics, max_batch_size=1, delay_s=0.0)
        first = asyncio.ensure_future(submit(batcher, images(1)))
        await asyncio.sleep(0.01)  # computing for 100 ms
        with pytest.raises(DeadlineExceededError, match="timeout passed while it was queued"):
            await submit(batcher, images(1), timeout_us=20_000)
        await first
        await batcher.close()

    asyncio.run(main())
    assert slow.batches == 1  # the expired request never ran
    assert sample(metrics, "requests_dropped_total", reason="deadline") == 1


def test_batches_are_timed_per_batch_size_and_per_request(runtime: Runtime) -> None:
    metrics = Metrics()

    async def main() -> tuple[Batcher, list[Timing]]:
        batcher = make_batcher(Slow(runtime, 0.02), metrics, max_batch_size=4, delay_s=0.0)
        timings = [Timing() for _ in range(4)]
        for timing in timings:
            timing.decoded()
        first = asyncio.ensure_future(submit(batcher, images(1), timing=timings[0]))
        await asyncio.sleep(0.005)  # computing alone; the next three queue behind it
        await asyncio.gather(
            first, *(submit(batcher, images(1), timing=timings[i]) for i in (1, 2, 3))
        )
        big = Timing()
        await submit(batcher, images(6), timing=big)  # chunks of 4 and 2
        await batcher.close()
        return batcher, [*timings, big]

    batcher, timings = asyncio.run(main())
    stats = batcher.stats
    assert sorted(stats.batches) == [1, 2, 3, 4]
    assert [stats.batches[size].compute_infer.count for size in (1, 2, 3, 4)] == [1, 1, 1, 1]
    for batch in stats.batches.values():
        counts = {batch.compute_input.count, batch.compute_infer.count, batch.compute_output.count}
        assert counts == {1}
        assert batch.compute_infer.ns >= 15_000_000  # the runtime's 20 ms
        assert batch.compute_input.ns > 0 and batch.compute_output.ns > 0  # measured
    assert (stats.execution_count, stats.inference_count) == (4, 10)
    assert timings[0].batches == [(1, 1.0)]
    assert [t.batches for t in timings[1:4]] == [[(3, 1.0)]] * 3
    assert timings[1].queue_ns >= 10_000_000  # waited behind the first batch
    assert timings[4].batches == [(4, 4 / 6), (2, 2 / 6)]  # one request, two batches
    assert timings[4].infer_ns >= 2 * 15_000_000


# --- no queue delay: a lone request never waits, a loaded queue waits for companions ----------


def test_without_a_delay_a_lone_request_does_not_wait_for_the_load_window(
    runtime: Runtime,
) -> None:
    """Delay 0 with a long window: requests one after another each run at once."""
    metrics = Metrics()

    async def main() -> list[float]:
        batcher = make_batcher(runtime, metrics, delay_s=0.0, load_window_s=1.0)
        took = []
        for i in range(5):
            began = time.monotonic()
            await submit(batcher, images(1, seed=i))
            took.append(time.monotonic() - began)
        await batcher.close()
        return took

    took = asyncio.run(main())
    assert max(took) < 0.5, took  # far below the 1 s window: nothing waited for it
    assert sample(metrics, "batch_size_count") == 5


def test_without_a_delay_a_loaded_queue_waits_the_window_and_batches(runtime: Runtime) -> None:
    """Two requests queued at once show load: the batch waits for the stragglers that follow."""
    metrics = Metrics()

    async def main() -> None:
        batcher = make_batcher(runtime, metrics, delay_s=0.0, load_window_s=0.3)
        first = [asyncio.ensure_future(submit(batcher, images(1, seed=i))) for i in range(2)]
        await asyncio.sleep(0.05)  # inside the window: these join the same batch
        later = [asyncio.ensure_future(submit(batcher, images(1, seed=9 + i))) for i in range(3)]
        await asyncio.gather(*first, *later)
        await batcher.close()

    asyncio.run(main())
    assert sample(metrics, "batch_size_sum") == 5
    assert sample(metrics, "batch_size_count") == 1  # one batch: the window held it open


def test_without_a_delay_and_no_window_batches_hold_what_queued_together(
    runtime: Runtime,
) -> None:
    """--batch-window-us 0: a batch never waits, even under load (Triton's literal 0)."""
    metrics = Metrics()

    async def main() -> None:
        batcher = make_batcher(runtime, metrics, delay_s=0.0, load_window_s=0.0)
        first = [asyncio.ensure_future(submit(batcher, images(1, seed=i))) for i in range(2)]
        await asyncio.sleep(0.05)
        later = [asyncio.ensure_future(submit(batcher, images(1, seed=9 + i))) for i in range(3)]
        await asyncio.gather(*first, *later)
        await batcher.close()

    asyncio.run(main())
    assert sample(metrics, "batch_size_sum") == 5
    assert sample(metrics, "batch_size_count") == 2  # the first two, then the three
