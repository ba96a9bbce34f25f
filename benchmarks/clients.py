"""Client processes that generate the load together, so one Python process is not the limit.

Each process runs measure.run_load on its share of the load over the same wall-clock window;
the parent merges their samples. The processes start once per benchmark run (spawn: no gRPC
state is inherited across fork) and take one job at a time over a pipe:

  parent -> job; child -> READY once its channel is open and its requests are built;
  parent (once every child is ready) -> start time; child -> its Sample (or an error).

So no process starts its window late because it was slow to connect, and the parent reads
the server's CPU and batches over the window the clients really measure.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection

from benchmarks.calls import READY_WAIT_S
from benchmarks.common import BenchError, Config, Sample
from benchmarks.measure import MAX_START_WAIT_S, Timing, run_load

# Seconds between the start time being sent and the load starting: enough for every process
# to read it and wake up.
START_LEAD_S = 0.2
# A process whose load began later than this after the agreed start is reported as late.
LATE_TOLERANCE_S = 0.05
# Longest a process may take to connect and build its requests before the parent gives up.
READY_BOUND_S = READY_WAIT_S + 20.0

READY = "ready"
SAMPLE = "sample"
FAILED = "failed"


@dataclass(frozen=True)
class Job:
    target: str
    config: Config  # closed loop: its concurrency is this process's share
    timing: Timing
    rate: float | None = None  # open loop: this process's share of the offered rate
    seed: str = "0"  # open loop: this process's own arrivals

    @property
    def share(self) -> float:
        """What this process carries: requests in flight, or requests/s offered."""
        return self.config.concurrency if self.rate is None else self.rate


def split_load(
    target: str,
    config: Config,
    timing: Timing,
    processes: int,
    rate: float | None = None,
    run_seed: int = 0,
) -> list[Job]:
    """The jobs of one measurement, split evenly over at most `processes` processes.

    Closed loop: a process gets at least one worker or no job at all, so concurrency 1 stays
    one request in flight however many processes there are. Open loop: every process sends
    rate / processes, each from a seed of its own.
    """
    if rate is not None:
        return [
            Job(target, config, timing, rate / processes, f"{run_seed}:{i}")
            for i in range(processes)
        ]
    n = min(processes, config.concurrency)
    shares = [config.concurrency // n + (1 if i < config.concurrency % n else 0) for i in range(n)]
    return [Job(target, replace(config, concurrency=share), timing) for share in shares]


class _Stopped(Exception):
    """The parent gave up on the job (another process failed) or is closing the pool."""


def _serve_jobs(connection: Connection) -> None:
    """A client process: run each job it is sent, answer its Sample (or the error's text)."""

    async def start() -> float:
        connection.send((READY, None))
        if not await asyncio.to_thread(connection.poll, MAX_START_WAIT_S):
            raise _Stopped
        start_at = connection.recv()
        if start_at is None:
            raise _Stopped
        return start_at

    while (job := connection.recv()) is not None:
        try:
            sample = asyncio.run(
                run_load(
                    job.target,
                    job.config,
                    job.timing,
                    job.rate,
                    start=start,
                    seed=job.seed,
                    settled=True,
                )
            )
        except _Stopped:
            connection.send((FAILED, "stopped"))
        except BenchError as error:
            connection.send((FAILED, str(error)))
        except Exception as error:  # reported by the parent as one line, not a hang
            connection.send((FAILED, f"client process failed: {type(error).__name__}: {error}"))
        else:
            connection.send((SAMPLE, sample))


class ClientPool:
    """`processes` client processes; `start` and `collect` run one measurement on them."""

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._connections: list[Connection] = []
        self._processes = []
        self._busy: list[Connection] = []
        for _ in range(processes):
            parent, child = context.Pipe()
            process = context.Process(target=_serve_jobs, args=(child,), daemon=True)
            process.start()
            child.close()
            self._connections.append(parent)
            self._processes.append(process)

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def size(self) -> int:
        return len(self._processes)

    def start(self, jobs: Sequence[Job]) -> float:
        """Send the jobs, wait until every process is ready, then give them all one start time
        (returned, wall clock). BenchError, every process stopped, if one cannot start."""
        if not 0 < len(jobs) <= self.size:
            raise ValueError(f"{len(jobs)} jobs for {self.size} client processes")
        self._busy = self._connections[: len(jobs)]
        for connection, job in zip(self._busy, jobs, strict=True):
            connection.send(job)
        try:
            answers = self._answers(READY_BOUND_S)
        except BenchError:
            self._stop_all()
            raise
        ready = [c for c, (kind, _) in zip(self._busy, answers, strict=True) if kind == READY]
        if len(ready) < len(self._busy):
            for connection in ready:
                connection.send(None)
            self._busy = ready
            with contextlib.suppress(BenchError):
                self._answers(READY_BOUND_S)  # their "stopped", so the pool stays usable
            raise BenchError(next(text for kind, text in answers if kind == FAILED))
        start_at = time.time() + START_LEAD_S
        for connection in self._busy:
            connection.send(start_at)
        return start_at

    def collect(self, bound_s: float) -> list[Sample]:
        """Every started process's sample; BenchError if one failed or did not answer."""
        answers = self._answers(bound_s)
        problems = [payload for kind, payload in answers if kind != SAMPLE]
        if problems:
            raise BenchError(problems[0])
        return [payload for _, payload in answers]

    def _answers(self, bound_s: float) -> list[tuple[str, object]]:
        deadline = time.monotonic() + bound_s
        answers = []
        for connection in self._busy:
            if not connection.poll(max(deadline - time.monotonic(), 0.0)):
                raise BenchError(f"a client process did not answer within {bound_s:g} s")
            answers.append(connection.recv())
        return answers

    def _stop_all(self) -> None:
        """A process that never answered is stuck: end them all rather than reuse them."""
        for process in self._processes:
            process.kill()
        self._busy = []

    def close(self) -> None:
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.send(None)
        for process in self._processes:
            process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join()


def late_clients(sample: Sample) -> list[int]:
    """The client processes (by index) whose load began over LATE_TOLERANCE_S late."""
    return [i for i, late in enumerate(sample.start_late_s) if late > LATE_TOLERANCE_S]
