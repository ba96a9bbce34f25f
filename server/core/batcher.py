"""Dynamic batching of decoded images for one loaded model version.

Design: ONE bounded queue per model version, drained by one worker task per runtime
instance (instance_group count). Each worker takes the next batch only when its instance
is free, so an idle instance never waits while another instance's queue is backed up,
and no balancing between queues is needed. Each instance runs its batches on its own
one-thread executor (onnxruntime and torch release the GIL), so while batches compute the
event loop keeps accepting requests and the free workers form the next batch. Batches of at
most `inline_rows` rows (a size the model computes in well under a millisecond, measured at
load: server.core.loading.inline_rows) run on the event loop's thread instead: handing a batch to
the thread and back (a wake-up, a future, the GIL passed both ways) costs more CPU than such
a batch does, and the GIL hand-back makes it wait behind the event loop's other work.

A batch closes when its rows reach max_batch_size, or when the oldest queued request has
waited its delay (measured with time.monotonic, waiting on a wake-up future with a timer: no
polling), or at shutdown. The delay is max_queue_delay when the model sets one (Triton's
meaning: every batch may wait that long). A model that sets none (0, Triton's default) gets
`load_window` instead, and only under load: when the queue holds several requests or the
previous batch held several. A lone request never waits; under load a batch waits a moment
for companions. (Triton's batches grow while its instance computes in another thread; small
batches here run on the event loop's thread, where nothing arrives meanwhile, so without the
window they would stay at one request each.) With adaptive_delay (--adaptive-batch-delay) a
configured max_queue_delay is skipped the same way for lone requests.

Requests are taken by priority level, then in arrival order (server.core.queues: Triton's
priority levels and queue policies); a request that does not fit into the room left in a
batch starts the next one (requests are never split across batches, except that `submit`
cuts a request larger than max_batch_size into chunks of at most max_batch_size rows, each
its own queue item, and reassembles them). Each batch is timed for the statistics extension
(server.core.modelstats): its assembly, its run and its split, into the batch size's counts and
into the timing of each request in it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from server.core.modelstats import ModelStats, Timing
from server.core.queues import PriorityQueue, SchedulePolicy
from server.errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelUnavailableError,
    QueueFullError,
)
from server.observability import tracing
from server.observability.metrics import Metrics
from server.runtimes.base import Runtime, Tensors

log = logging.getLogger(__name__)


class BatchError(RuntimeError):
    """A batch that came back from the runtime unusable (wrong type or row count)."""


@dataclass(eq=False)
class _Item:
    inputs: Tensors  # by name; each with `rows` rows when the model batches
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued: float  # time.monotonic()
    deadline: float | None  # time.monotonic() seconds: the caller's own (gRPC's deadline)
    expires: float | None  # time.monotonic() seconds: the queue policy's timeout
    level: int  # priority level (server.core.queues)
    timing: Timing | None  # the request's clock, shared by its chunks
    share: float  # this chunk's share of the request's rows
    queued: bool = False  # in the queue (not yet taken into a batch)
    trace: tracing.RequestTrace | None = None  # a sampled request's (tracing on only)
    rows: int = 1  # read many times per batch, kept once
    key: object = None  # the tensors' shapes past the batch dim: equal keys stack


class Batcher:
    """Queue + one batch loop per runtime instance. Use from one event loop only."""

    def __init__(
        self,
        runtimes: Sequence[Runtime],
        *,
        model: str,
        version: int | str,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        metrics: Metrics,
        stats: ModelStats | None = None,
        adaptive_delay: bool = False,
        load_window_s: float = 0.0,
        inline_rows: int = 0,
        schedule: SchedulePolicy | None = None,
        batched: bool = True,
    ) -> None:
        if not runtimes:
            raise ValueError("a batcher needs at least one runtime instance")
        if max_batch_size < 1 or max_queue_size < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_size and max_queue_size >= 1, max_queue_delay_s >= 0")
        self.model = model
        self.version = str(version)
        # False (max_batch_size 0 in the config): the tensors have no batch dimension, and
        # each request is a batch of its own, run as it came.
        self.batched = batched
        self.max_batch_size = max_batch_size if batched else 1
        self.max_queue_delay_s = max_queue_delay_s
        # Adaptive: a lone request runs at once unless the last batch held several requests
        # (evidence of concurrent load, where waiting pays); see _next_batch.
        self.adaptive_delay = adaptive_delay
        self.load_window_s = load_window_s
        self.inline_rows = inline_rows
        # Tracing as it was when the model loaded (it is set up before): None while it is off.
        self._tracing = tracing.ACTIVE
        self._last_batch_requests = 0
        # The bound is per instance (Settings.max_queue_size): N instances drain N times faster.
        self.capacity = max_queue_size * len(runtimes)
        self.stats = stats if stats is not None else ModelStats()
        self._runtimes = list(runtimes)
        self._queue: PriorityQueue[_Item] = PriorityQueue(
            schedule or SchedulePolicy(), self.capacity
        )
        self._waiters: set[asyncio.Future[None]] = set()
        self._workers: list[asyncio.Task[None]] = []
        self._executors: list[ThreadPoolExecutor] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        labels = (model, self.version)
        self._m_inferences = metrics.inferences.labels(*labels)
        self._m_ok = metrics.batches.labels(*labels, "success")
        self._m_failed = metrics.batches.labels(*labels, "failure")
        self._m_cancelled = metrics.dropped.labels(*labels, "cancelled")
        self._m_deadline = metrics.dropped.labels(*labels, "deadline")
        self._m_queue = metrics.queue_duration.labels(*labels)
        self._m_compute = metrics.compute_duration.labels(*labels)
        self._m_batch_size = metrics.batch_size.labels(*labels)
        self._m_depth = metrics.queue_depth.labels(*labels)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the batch loops on the running event loop."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        for index, runtime in enumerate(self._runtimes):
            executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"{self.model}-v{self.version}-{index}"
            )
            self._executors.append(executor)
            self._workers.append(
                self._loop.create_task(
                    self._worker(runtime, executor), name=f"batcher {self.model} v{self.version}"
                )
            )

    async def close(self) -> None:
        """Refuse new requests, finish every accepted one, then stop the loops and threads."""
        self._closing = True
        self._wake()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)
        for executor in self._executors:
            executor.shutdown(wait=False)  # idle by now: every batch has been awaited

    @property
    def accepting(self) -> bool:
        return self._loop is not None and not self._closing

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def schedule(self) -> SchedulePolicy:
        return self._queue.schedule

    def describe_wait(self) -> str:
        """How long a batch waits for companions, as the model's ready line tells operators
        (a delay kept from an older config.pbtxt makes every lone request wait)."""
        delay_us = round(self.max_queue_delay_s * 1e6)
        window_us = round(self.load_window_s * 1e6)
        if delay_us == 0:
            if window_us == 0:
                return "batches never wait for companions"
            return f"a lone request runs at once, under load a batch waits up to {window_us} us"
        if self.adaptive_delay:
            return (
                f"a lone request runs at once, under load a batch waits up to {delay_us} us "
                "(max_queue_delay_microseconds)"
            )
        return (
            f"every batch waits up to {delay_us} us for companions, a lone request too "
            "(the queue delay; --adaptive-batch-delay runs a lone request at once)"
        )

    # -- the caller's side -----------------------------------------------------------------

    async def submit(
        self,
        inputs: Tensors,
        deadline: float | None = None,
        *,
        priority: int = 0,
        timeout_us: int = 0,
        timing: Timing | None = None,
    ) -> dict[str, np.ndarray]:
        """Queue a request's input tensors (N rows each, when the model batches); returns
        every output, row i answering row i.

        `priority` and `timeout_us` are the request's schedule-policy parameters (0: the
        model's defaults); `timing` collects its queue and compute times. A request larger
        than max_batch_size becomes several queue items, answered whole. If the caller is
        cancelled, its queued items are dropped before compute.
        """
        n = next(iter(inputs.values())).shape[0] if self.batched and inputs else 1
        size = self.max_batch_size
        if n <= size:
            chunks = [inputs]
        else:
            chunks = [{k: v[i : i + size] for k, v in inputs.items()} for i in range(0, n, size)]
        trace = tracing.CURRENT.get() if self._tracing is not None else None
        items = self.enqueue(
            chunks, deadline, priority=priority, timeout_us=timeout_us, timing=timing, trace=trace
        )
        try:
            if len(items) == 1:
                result = await items[0].future
                if trace is not None:
                    trace.answered()
                return result
            parts = [await item.future for item in items]
        except BaseException:
            # A caller that hung up (its task cancelled, and with it the awaited future)
            # frees its queue slots at once, not when its batch forms.
            for item in items:
                if not item.future.done():
                    item.future.cancel()
                elif not item.future.cancelled():
                    item.future.exception()  # retrieved: one failure is reported, not several
                self._discard_if_cancelled(item)
            raise
        if trace is not None:
            trace.answered()
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def enqueue(
        self,
        chunks: Sequence[Tensors],
        deadline: float | None = None,
        *,
        priority: int = 0,
        timeout_us: int = 0,
        timing: Timing | None = None,
        trace: tracing.RequestTrace | None = None,
    ) -> list[_Item]:
        """Queue each chunk (at most max_batch_size rows) as one item, all or none.

        More chunks than the queue can ever hold is the request's fault (InvalidInputError);
        more than it holds now is QueueFullError.
        """
        if not self.accepting:
            raise ModelUnavailableError(
                f"model {self.model!r} version {self.version} is not accepting requests"
            )
        queue = self._queue
        level = queue.schedule.level_of(priority)
        counts = [self._rows(chunk) for chunk in chunks]
        if len(chunks) > queue.limit(level):  # "retry later" would never come true
            rows = sum(counts)
            raise InvalidInputError(
                f"request of {rows} images is too large for this server's queue: model "
                f"{self.model!r} version {self.version} takes at most "
                f"{queue.limit(level) * self.max_batch_size} images per request"
            )
        if len(chunks) > queue.free(level):
            where = f" at priority level {level}" if level else ""
            raise QueueFullError(
                f"model {self.model!r} version {self.version}: queue full{where} "
                f"({len(queue)} requests waiting); retry later"
            )
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            self._m_deadline.inc()
            raise DeadlineExceededError("deadline passed before the request was queued")
        if any(count > self.max_batch_size or count < 1 for count in counts):
            raise ValueError(f"each chunk must have 1..{self.max_batch_size} rows")
        assert self._loop is not None
        timeout = queue.timeout_s(level, timeout_us)
        expires = None if timeout is None else now + timeout
        was_empty = not queue
        total = sum(counts)
        key = self._key(chunks[0])
        items = [
            _Item(
                chunk,
                self._loop.create_future(),
                now,
                deadline,
                expires,
                level,
                timing,
                count / total,
                trace=trace,
                rows=count,
                key=key,
            )
            for chunk, count in zip(chunks, counts, strict=True)
        ]
        queue.push(items)
        self._m_depth.set(len(queue))
        if trace is not None:
            trace.queued(total)
        # A waiting worker needs waking only when its plan changes: the queue was empty (it
        # waits with no timer) or a batch is now full. Otherwise its timer for the oldest
        # request still holds, and waking it per request would cost a timer per request.
        if was_empty or queue.rows >= self.max_batch_size:
            self._wake()
        return items

    def _rows(self, tensors: Tensors) -> int:
        if not self.batched or not tensors:
            return 1
        return next(iter(tensors.values())).shape[0]

    def _key(self, tensors: Tensors) -> object:
        """Requests stack when their tensors' names and shapes past the batch dim agree."""
        if len(tensors) == 1:  # the common case, kept cheap
            ((name, array),) = tensors.items()
            return (name, array.shape[1:])
        return tuple((name, array.shape[1:]) for name, array in tensors.items())

    # -- the batch loop --------------------------------------------------------------------

    async def _worker(self, runtime: Runtime, executor: ThreadPoolExecutor) -> None:
        while True:
            items = await self._next_batch()
            if items is None:
                return
            try:
                await self._execute(items, runtime, executor)
            except Exception as exc:  # a fault here must not end the loop of later batches
                log.exception("model %s version %s: batch failed", self.model, self.version)
                self._fail(items, exc)

    async def _next_batch(self) -> list[_Item] | None:
        """Wait until a batch is due and take it; None once closing with nothing queued.

        While it waits, requests whose queue-policy timeout passes are rejected (or delayed)
        as it passes, not when the batch forms.
        """
        queue = self._queue
        while True:
            self._expire()
            if not queue:
                if self._closing:
                    return None
                await self._wait(None)
                continue
            if not (self._closing or queue.rows >= self.max_batch_size):
                oldest = queue.oldest()
                assert oldest is not None
                now = time.monotonic()
                remaining = oldest + self._delay() - now
                if remaining > 0:
                    expiry = queue.next_expiry()
                    await self._wait(remaining if expiry is None else min(remaining, expiry - now))
                    continue
            items = self._take()
            if items:
                return items

    def _delay(self) -> float:
        """How long the oldest request may wait for companions (see the module doc)."""
        loaded = len(self._queue) >= 2 or self._last_batch_requests >= 2
        if self.max_queue_delay_s == 0:
            return self.load_window_s if loaded else 0.0
        if self.adaptive_delay and not loaded:  # no companion is coming
            return 0.0
        return self.max_queue_delay_s

    def _expire(self) -> None:
        self._reject(self._queue.expire(time.monotonic()))

    def _reject(self, items: list[_Item]) -> None:
        for item in items:
            self._m_deadline.inc()
            if not item.future.done():
                item.future.set_exception(
                    DeadlineExceededError("the request's timeout passed while it was queued")
                )
        if items:
            self._m_depth.set(len(self._queue))

    def _take(self) -> list[_Item]:
        """The next batch; requests whose queue-policy timeout passed are rejected on the way."""
        items, rejected = self._queue.take(self.max_batch_size, time.monotonic())
        self._reject(rejected)
        self._last_batch_requests = len(items)
        self._m_depth.set(len(self._queue))
        return items

    def _discard_if_cancelled(self, item: _Item) -> None:
        """A caller that hung up frees its queue slot at once, not when its batch forms."""
        if item.queued and item.future.cancelled():
            self._queue.remove(item)
            self._m_cancelled.inc()
            self._m_depth.set(len(self._queue))

    async def _wait(self, timeout: float | None) -> None:
        """Sleep until an enqueue, close, or `timeout` seconds (monotonic) pass."""
        assert self._loop is not None
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.add(waiter)
        timer = None if timeout is None else self._loop.call_later(timeout, _wake_one, waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)
            if timer is not None:
                timer.cancel()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            _wake_one(waiter)

    async def _execute(
        self, items: list[_Item], runtime: Runtime, executor: ThreadPoolExecutor
    ) -> None:
        started = time.monotonic()
        live: list[_Item] = []
        for item in items:
            if item.future.done():  # the caller went away after the batch was taken
                self._m_cancelled.inc()
            elif item.deadline is not None and started >= item.deadline:
                item.future.set_exception(
                    DeadlineExceededError("deadline passed while the request was queued")
                )
                self._m_deadline.inc()
            else:
                live.append(item)
        if not live:
            return
        waits = [started - item.enqueued for item in live]
        for waited in waits:
            self._m_queue.observe(waited)
        rows = sum(item.rows for item in live)
        t0 = time.perf_counter_ns()
        batch = live[0].inputs if len(live) == 1 else _stack([i.inputs for i in live])
        t1 = time.perf_counter_ns()
        self._m_batch_size.observe(rows)
        assert self._loop is not None
        try:
            if rows <= self.inline_rows:
                output = runtime.run(batch)
            else:
                output = await self._loop.run_in_executor(executor, runtime.run, batch)
            if self.batched:
                _check_output(output, rows)
        except Exception as exc:
            self._m_failed.inc()
            if self._tracing is not None:
                elapsed = time.perf_counter_ns() - t1
                self._tracing.record_batch(self.model, self.version, live, started, elapsed, exc)
            log.warning(
                "model %s version %s: batch of %d rows failed: %s: %s",
                self.model, self.version, rows, type(exc).__name__, exc,
            )  # fmt: skip
            self._fail(live, exc)
            return
        t2 = time.perf_counter_ns()
        if self._tracing is not None:
            self._tracing.record_batch(self.model, self.version, live, started, t2 - t1, None)
        if len(live) == 1:
            if not live[0].future.done():
                live[0].future.set_result(output)
        else:
            offset = 0
            for item in live:
                if not item.future.done():  # cancelled callers are skipped, never set twice
                    end = offset + item.rows
                    item.future.set_result({k: v[offset:end] for k, v in output.items()})
                offset += item.rows
        t3 = time.perf_counter_ns()
        self._m_ok.inc()
        self._m_inferences.inc(rows)
        self._m_compute.observe((t2 - t1) / 1e9)
        assembly, infer, split = t1 - t0, t2 - t1, t3 - t2
        decoding = 0
        for item, waited in zip(live, waits, strict=True):
            timing = item.timing
            if timing is not None:
                decoding += int(timing.decode_ns * item.share)
                timing.ran(rows, item.share, int(waited * 1e9), assembly, infer, split)
        self.stats.batch(rows, assembly + decoding, infer, split)

    @staticmethod
    def _fail(items: list[_Item], exc: BaseException) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(exc)


def _wake_one(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _stack(parts: list[Tensors]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _check_output(output: object, rows: int) -> None:
    if not isinstance(output, dict):
        raise BatchError(f"runtime returned {type(output).__name__}, expected tensors by name")
    for name, tensor in output.items():
        if not isinstance(tensor, np.ndarray) or tensor.ndim < 1:
            shape = getattr(tensor, "shape", type(tensor).__name__)
            raise BatchError(f"runtime returned {shape} for output {name!r}, expected rows")
        if tensor.shape[0] != rows:
            raise BatchError(
                f"runtime returned {tensor.shape[0]} rows of {name!r} for a batch of {rows}"
            )
