"""One client process's share of one measurement: closed loop or open loop, bounded in time.

Closed loop: `concurrency` workers, each keeping one request in flight (the next is sent when
the answer arrives). Open loop: requests leave at a fixed offered rate (Poisson arrivals)
whatever the server does, and latency counts from the scheduled send time, so a server that
falls behind shows it in latency instead of quietly slowing the client down.

Only answers that arrive inside the measured window (after the warm-up) count. Several client
processes agree on the window through `start_at`, a wall-clock time, so their samples merge.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from benchmarks.calls import CHANNEL_OPTIONS, Call, model_info
from benchmarks.common import Config, Sample
from benchmarks.modes import open_calls

# Open loop: requests in flight per client process before new arrivals are counted as
# dropped by the client ("CLIENT_BACKLOG") rather than piling up without bound.
MAX_OUTSTANDING = 4096
CLIENT_BACKLOG = "CLIENT_BACKLOG"


@dataclass(frozen=True)
class Window:
    """When a measurement runs: load from `start`, counted from +warmup_s for duration_s."""

    start: float  # time.perf_counter() value
    warmup_s: float
    duration_s: float
    timeout_s: float

    @property
    def counted_from(self) -> float:
        return self.start + self.warmup_s

    @property
    def end(self) -> float:
        return self.counted_from + self.duration_s

    @property
    def bound_s(self) -> float:
        """Longest the whole measurement may take: the last calls end within their timeout."""
        return self.warmup_s + self.duration_s + self.timeout_s + 5.0

    @classmethod
    def starting_at(
        cls, wall_time: float, warmup_s: float, duration_s: float, timeout_s: float
    ) -> Window:
        """The window of a measurement that starts at a wall-clock (time.time()) instant."""
        start = time.perf_counter() + max(wall_time - time.time(), 0.0)
        return cls(start, warmup_s, duration_s, timeout_s)


async def run_load(
    target: str,
    config: Config,
    window: Window,
    ready_wait_s: float,
    rate: float | None = None,
    server_cpu: Callable[[], float | None] = lambda: None,
    check: Callable[[], None] = lambda: None,
    settled: bool = False,
) -> Sample:
    """Closed loop with `config.concurrency` workers, or open loop at `rate` requests/s.

    `check` and `settled` are passed to model_info (a started server: fail rather than wait).
    """
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        model = await model_info(channel, target, config.model, ready_wait_s, check, settled)
        lifetime = window.bound_s
        async with open_calls(channel, config, model, window.timeout_s, lifetime) as calls:
            if time.perf_counter() > window.start:  # late: keep the window's length
                window = Window(time.perf_counter(), *_lengths(window))
            await asyncio.sleep(max(window.start - time.perf_counter(), 0.0))
            if rate is None:
                return await _closed_loop(calls, config.concurrency, window, server_cpu)
            return await _open_loop(calls[0], rate, window, server_cpu)


def _lengths(window: Window) -> tuple[float, float, float]:
    return window.warmup_s, window.duration_s, window.timeout_s


class _Tally:
    """Latencies and error codes of the answers that arrive inside the window."""

    def __init__(self, window: Window) -> None:
        self.window = window
        self.latencies: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()

    def add(self, code: str, sent: float, done: float) -> None:
        if self.window.counted_from <= done <= self.window.end:
            if code == "OK":
                self.latencies.append(done - sent)
            else:
                self.errors[code] += 1


async def _cpu_meter(
    window: Window, server_cpu: Callable[[], float | None]
) -> tuple[float, float | None]:
    """CPU seconds this process and the server used inside the window."""
    await asyncio.sleep(max(window.counted_from - time.perf_counter(), 0.0))
    client, server = time.process_time(), server_cpu()
    await asyncio.sleep(max(window.end - time.perf_counter(), 0.0))
    client_after, server_after = time.process_time(), server_cpu()
    used = None if server is None or server_after is None else server_after - server
    return client_after - client, used


async def _closed_loop(
    calls: list[Call], concurrency: int, window: Window, server_cpu: Callable[[], float | None]
) -> Sample:
    """`concurrency` workers spread over `calls`, each keeping one request in flight."""
    tally = _Tally(window)

    async def worker(call: Call) -> None:
        while (sent := time.perf_counter()) < window.end:
            code = await call()
            tally.add(code, sent, time.perf_counter())

    workers = [asyncio.ensure_future(worker(calls[i % len(calls)])) for i in range(concurrency)]
    return await _finish(workers, tally, server_cpu)


async def _open_loop(
    call: Call, rate: float, window: Window, server_cpu: Callable[[], float | None]
) -> Sample:
    """Poisson arrivals at `rate` per second until the window ends."""
    tally = _Tally(window)
    in_flight: set[asyncio.Future[None]] = set()
    arrivals = random.Random(0)

    async def one(scheduled: float) -> None:
        code = await call()
        tally.add(code, scheduled, time.perf_counter())

    async def sender() -> None:
        scheduled = window.start
        while scheduled < window.end:
            await asyncio.sleep(max(scheduled - time.perf_counter(), 0.0))
            if len(in_flight) >= MAX_OUTSTANDING:
                tally.add(CLIENT_BACKLOG, scheduled, time.perf_counter())
            else:
                task = asyncio.ensure_future(one(scheduled))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            scheduled += arrivals.expovariate(rate)
        if in_flight:
            await asyncio.wait(set(in_flight))

    return await _finish([asyncio.ensure_future(sender())], tally, server_cpu)


async def _finish(
    tasks: list[asyncio.Future[None]], tally: _Tally, server_cpu: Callable[[], float | None]
) -> Sample:
    meter = asyncio.ensure_future(_cpu_meter(tally.window, server_cpu))
    bound = tally.window.end + tally.window.timeout_s + 5.0 - time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), max(bound, 0.1))
        client_cpu, used_by_server = await meter
    finally:
        for task in [*tasks, meter]:
            task.cancel()
    return Sample(
        tally.latencies, tally.errors, tally.window.duration_s, client_cpu, used_by_server
    )
