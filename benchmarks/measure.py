"""One client process's share of one measurement: closed loop or open loop, bounded in time.

Closed loop: `concurrency` workers, each keeping one request in flight (the next is sent when
the answer arrives). Open loop: requests leave at a fixed offered rate (Poisson arrivals)
whatever the server does, and latency counts from the scheduled send time, so a server that
falls behind shows it in latency instead of quietly slowing the client down.

Only answers that arrive inside the measured window (after the warm-up) count. The client
first opens its channel and builds its requests, then awaits `start`: the wall-clock time the
load begins. Several client processes get the same time only once all of them are ready, so
their windows coincide and their samples merge; each reports how late its load really began.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from benchmarks.calls import CHANNEL_OPTIONS, Call, model_info
from benchmarks.common import Config, Sample
from benchmarks.modes import open_calls

if TYPE_CHECKING:
    from benchmarks.server import ServerProcess

# Open loop: requests in flight per client process before new arrivals are counted as
# dropped by the client ("CLIENT_BACKLOG") rather than piling up without bound.
MAX_OUTSTANDING = 4096
CLIENT_BACKLOG = "CLIENT_BACKLOG"
# Longest a ready client waits for its start time (streams opened meanwhile must outlive it).
MAX_START_WAIT_S = 60.0

# Awaited once the client is ready to send; returns the wall-clock (time.time()) start.
StartSignal = Callable[[], Awaitable[float]]


async def start_now() -> float:
    """A lone client starts as soon as it is ready."""
    return time.time()


@dataclass(frozen=True)
class Timing:
    """How long a measurement runs: warm-up, then duration_s counted; each request's deadline."""

    warmup_s: float
    duration_s: float
    timeout_s: float

    @property
    def bound_s(self) -> float:
        """Longest the whole measurement may take: the last calls end within their timeout."""
        return self.warmup_s + self.duration_s + self.timeout_s + 5.0


@dataclass(frozen=True)
class Window:
    """When a measurement runs: load from `start`, counted from +warmup_s for duration_s."""

    start: float  # time.perf_counter() value
    timing: Timing

    @property
    def counted_from(self) -> float:
        return self.start + self.timing.warmup_s

    @property
    def end(self) -> float:
        return self.counted_from + self.timing.duration_s

    @classmethod
    def starting_at(cls, wall_time: float, timing: Timing) -> Window:
        """The window of a measurement that starts at a wall-clock (time.time()) instant."""
        return cls(time.perf_counter() + wall_time - time.time(), timing)


def send_times(start: float, end: float, rate: float, seed: str) -> Iterator[float]:
    """Poisson arrivals at `rate` per second in [start, end).

    Client processes sharing an open-loop load each draw from a seed of their own: with one
    seed for all, N processes would send in bursts of N at 1/N of the total rate.
    """
    arrivals = random.Random(seed)
    scheduled = start + arrivals.expovariate(rate)
    while scheduled < end:
        yield scheduled
        scheduled += arrivals.expovariate(rate)


async def run_load(
    target: str,
    config: Config,
    timing: Timing,
    rate: float | None = None,
    *,
    start: StartSignal = start_now,
    seed: str = "0",
    server_cpu: Callable[[], float | None] = lambda: None,
    check: Callable[[], None] = lambda: None,
    settled: bool = False,
) -> Sample:
    """Closed loop with `config.concurrency` workers, or open loop at `rate` requests/s
    (arrivals drawn from `seed`), from the time `start` gives once requests are built.

    `check` and `settled` are passed to model_info (a started server: fail rather than wait).
    """
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        model = await model_info(channel, target, config.model, check=check, settled=settled)
        lifetime = MAX_START_WAIT_S + timing.bound_s
        async with open_calls(channel, config, model, timing.timeout_s, lifetime) as calls:
            window = Window.starting_at(await start(), timing)
            await asyncio.sleep(max(window.start - time.perf_counter(), 0.0))
            # Late (a slow wake-up on a busy machine): the window stays the agreed one, so
            # the server figures read over it still match; the lateness is reported.
            late = max(time.perf_counter() - window.start, 0.0)
            if rate is None:
                sample = await _closed_loop(calls, config.concurrency, window, server_cpu)
            else:
                schedule = send_times(window.start, window.end, rate, seed)
                sample = await _open_loop(calls[0], schedule, window, server_cpu)
    sample.start_late_s = (round(late, 4),)
    return sample


def measure_started(server: ServerProcess, config: Config, timing: Timing) -> Sample:
    """One closed-loop measurement of a server this run started: its CPU counted, and its
    death reported rather than waited for."""
    return asyncio.run(
        run_load(
            server.target,
            config,
            timing,
            server_cpu=server.cpu_seconds,
            check=server.check_alive,
            settled=True,
        )
    )


class _Tally:
    """Latencies and error codes of the answers that arrive inside the window."""

    def __init__(self, window: Window) -> None:
        self.window = window
        self.latencies: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.in_flight = 0
        self.peak_in_flight = 0

    def sent(self) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def answered(self, code: str, sent: float) -> None:
        self.in_flight -= 1
        self.add(code, sent, time.perf_counter())

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
            tally.sent()
            tally.answered(await call(), sent)

    workers = [asyncio.ensure_future(worker(calls[i % len(calls)])) for i in range(concurrency)]
    return await _finish(workers, tally, server_cpu)


async def _open_loop(
    call: Call, schedule: Iterator[float], window: Window, server_cpu: Callable[[], float | None]
) -> Sample:
    """One request at each scheduled time, whether or not earlier ones were answered."""
    tally = _Tally(window)
    in_flight: set[asyncio.Future[None]] = set()

    async def one(scheduled: float) -> None:
        tally.answered(await call(), scheduled)

    async def sender() -> None:
        for scheduled in schedule:
            await asyncio.sleep(max(scheduled - time.perf_counter(), 0.0))
            if len(in_flight) >= MAX_OUTSTANDING:
                tally.add(CLIENT_BACKLOG, scheduled, time.perf_counter())
            else:
                tally.sent()
                task = asyncio.ensure_future(one(scheduled))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(set(in_flight))

    return await _finish([asyncio.ensure_future(sender())], tally, server_cpu)


async def _finish(
    tasks: list[asyncio.Future[None]], tally: _Tally, server_cpu: Callable[[], float | None]
) -> Sample:
    meter = asyncio.ensure_future(_cpu_meter(tally.window, server_cpu))
    bound = tally.window.end + tally.window.timing.timeout_s + 5.0 - time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), max(bound, 0.1))
        client_cpu, used_by_server = await meter
    finally:
        for task in [*tasks, meter]:
            task.cancel()
    return Sample(
        tally.latencies,
        tally.errors,
        tally.window.timing.duration_s,
        client_cpu,
        used_by_server,
        tally.peak_in_flight,
    )
