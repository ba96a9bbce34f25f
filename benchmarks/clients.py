"""Client processes that generate the load together, so one Python process is not the limit.

Each process runs measure.run_load on its share of the load (concurrency or rate split
evenly) over the same wall-clock window; the parent merges their samples. The processes
start once per benchmark run (spawn: no gRPC state is inherited across fork) and take one
job at a time over a pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection

from benchmarks.common import BenchError, Config, Sample
from benchmarks.measure import Window, run_load

# Seconds between sending a job and its load starting: every process has its channel open
# and its requests built by then, so they all start together.
START_LEAD_S = 0.5
READY_WAIT_S = 10.0


@dataclass(frozen=True)
class Job:
    target: str
    config: Config
    start_at: float  # wall clock (time.time())
    warmup_s: float
    duration_s: float
    timeout_s: float
    rate: float | None = None  # open loop: this process's share of the offered rate


def _serve_jobs(connection: Connection) -> None:
    """A client process: run each job it is sent, answer its Sample (or the error's text)."""
    while (job := connection.recv()) is not None:
        window = Window.starting_at(job.start_at, job.warmup_s, job.duration_s, job.timeout_s)
        try:
            sample = asyncio.run(
                run_load(job.target, job.config, window, READY_WAIT_S, job.rate, settled=True)
            )
        except BenchError as error:
            connection.send(str(error))
        except Exception as error:  # reported by the parent as one line, not a hang
            connection.send(f"client process failed: {type(error).__name__}: {error}")
        else:
            connection.send(sample)


class ClientPool:
    """`processes` client processes; `run` splits one measurement across them."""

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._connections: list[Connection] = []
        self._processes = []
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

    def start(
        self,
        target: str,
        config: Config,
        window: tuple[float, float, float],
        rate: float | None = None,
    ) -> float:
        """Send every process its share; returns the wall-clock time the load starts."""
        warmup_s, duration_s, timeout_s = window
        start_at = time.time() + START_LEAD_S
        n = self.size
        for i, connection in enumerate(self._connections):
            share = config.concurrency // n + (1 if i < config.concurrency % n else 0)
            job = Job(
                target,
                replace(config, concurrency=max(share, 1)),
                start_at,
                warmup_s,
                duration_s,
                timeout_s,
                None if rate is None else rate / n,
            )
            connection.send(job)
        return start_at

    def collect(self, bound_s: float) -> list[Sample]:
        """Every process's sample; BenchError if one failed or none answered within bound_s."""
        deadline = time.monotonic() + bound_s
        samples: list[Sample] = []
        problems: list[str] = []
        for connection in self._connections:
            if not connection.poll(max(deadline - time.monotonic(), 0.0)):
                raise BenchError(f"a client process did not answer within {bound_s:g} s")
            answer = connection.recv()
            if isinstance(answer, str):
                problems.append(answer)
            else:
                samples.append(answer)
        if problems:
            raise BenchError(problems[0])
        return samples

    def close(self) -> None:
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.send(None)
        for process in self._processes:
            process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join()


def merge(samples: list[Sample], server_cpu_s: float | None) -> Sample:
    """One sample of the whole client side: latencies pooled, errors and client CPU summed."""
    latencies = [x for sample in samples for x in sample.latencies_s]
    errors = sum((sample.errors for sample in samples), start=type(samples[0].errors)())
    return Sample(
        latencies,
        errors,
        samples[0].duration_s,
        sum(sample.client_cpu_s for sample in samples),
        server_cpu_s,
    )
