"""The load the tuner measures a setting under: closed loop at the operator's concurrencies and
request sizes, each a load point, from h2load or from Python client processes.

h2load (Debian's `nghttp2-client`) replays one framed ModelInfer request over several
connections at a fraction of a Python client's CPU, which matters when client and server
share a few cores; its per-request log gives the latencies. It sees HTTP statuses only, so
the server's own /metrics count the answers by gRPC code over each point (benchmarks.h2load).
Without h2load, client processes run benchmarks.measure's closed loop (one channel each).
Either way connections, not requests, are spread over the server's workers, so the load
opens several.
"""

from __future__ import annotations

import collections
import math
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.clients import START_LEAD_S, ClientPool, split_load
from benchmarks.common import BenchError, Config
from benchmarks.figures import pooled
from benchmarks.h2load import MISSING, PATH, build_request, check_answer, frame, h2load_time
from benchmarks.measure import Timing
from benchmarks.rounds import median

H2LOAD, PYTHON = "h2load", "python"
# Connections a load point opens at most (fewer when its concurrency is lower): enough to
# spread over the workers of a small machine; the rest of the concurrency is streams on them.
MAX_CONNECTIONS = 8
# h2load cancels the requests in flight when its time is up: their answers are CANCELLED.
_ALLOWED_AT_END = "CANCELLED"


@dataclass(frozen=True)
class LoadPoint:
    concurrency: int  # requests in flight
    images: int  # per request

    @property
    def label(self) -> str:
        return f"c{self.concurrency}x{self.images}"


@dataclass(frozen=True)
class PointResult:
    images_per_s: float
    requests: int
    p50_ms: float | None
    p99_ms: float | None
    errors: dict[str, int]
    server_cpu_cores: float | None

    @property
    def ok(self) -> bool:
        return self.requests > 0 and not self.errors


@dataclass(frozen=True)
class Target:
    """A started server with the setting loaded: where to send, how to read it."""

    address: str
    cpu_seconds: Callable[[], float | None]
    answer_codes: Callable[[], collections.Counter[str]]


def connections_for(concurrency: int) -> tuple[int, int]:
    """(connections, streams per connection) holding `concurrency` requests in flight (a
    concurrency that does not divide evenly is rounded up to the next multiple)."""
    connections = min(concurrency, MAX_CONNECTIONS)
    return connections, math.ceil(concurrency / connections)


def held(point: LoadPoint, generator: str) -> int:
    """The concurrency a generator really holds for `point` (h2load: connections x streams)."""
    if generator == H2LOAD:
        connections, streams = connections_for(point.concurrency)
        return connections * streams
    return point.concurrency


def latency_figures(latencies_ms: Sequence[float]) -> tuple[float | None, float | None]:
    if not latencies_ms:
        return None, None
    p50, p99 = np.percentile(np.asarray(latencies_ms), [50, 99])
    return round(float(p50), 3), round(float(p99), 3)


def pick_generator(asked: str) -> str:
    """`auto`: h2load when it is on PATH, else the Python client processes."""
    if asked == "auto":
        return H2LOAD if shutil.which("h2load") else PYTHON
    if asked == H2LOAD and shutil.which("h2load") is None:
        raise BenchError(f"{MISSING} or use --load-generator python")
    return asked


class H2Load:
    name = H2LOAD

    def __init__(self, model: str, shape: tuple[int, ...], sizes: Sequence[int]) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="imgserve-tune-load-"))
        self._requests = {n: build_request(model, shape, n) for n in sorted(set(sizes))}
        self._frames = {}
        for images, request in self._requests.items():
            path = self._folder / f"request-{images}.grpc"
            path.write_bytes(frame(request))
            self._frames[images] = path

    def check(self, target: Target, images: int) -> None:
        """A real gRPC client's call with the replayed request gets well-formed answers."""
        check_answer(target.address, self._requests[images], images)

    def run(self, target: Target, point: LoadPoint, timing: Timing) -> PointResult:
        connections, streams = connections_for(point.concurrency)
        log = self._folder / "requests.log"
        log.unlink(missing_ok=True)
        command = [
            "h2load", "-c", str(connections), "-m", str(streams), "-t", "1",
            f"--duration={h2load_time(timing.duration_s)}",
            f"--warm-up-time={h2load_time(timing.warmup_s)}",
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            f"--log-file={log}", "-d", str(self._frames[point.images]),
            f"http://{target.address}{PATH}",
        ]  # fmt: skip
        codes_before = target.answer_codes()
        cpu_before = target.cpu_seconds()
        limit = timing.warmup_s + timing.duration_s + timing.timeout_s + 30
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit, check=False)
        cpu_after = target.cpu_seconds()
        codes = target.answer_codes()
        codes.subtract(codes_before)
        if done.returncode != 0 or not log.exists():
            raise BenchError(f"h2load failed against {target.address}:\n{done.stdout[-800:]}")
        # The log holds the measured window's requests (not the warm-up's): start time (us
        # since the epoch), HTTP status (-1: the stream failed), microseconds to the answer.
        latencies, failed = [], 0
        for line in log.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and parts[1] == "200":
                latencies.append(int(parts[2]) / 1000)
            elif len(parts) >= 3:
                failed += 1
        errors = {code: n for code, n in codes.items() if n > 0 and code not in ("OK", "")}
        if errors.get(_ALLOWED_AT_END, 0) <= connections * streams:
            errors.pop(_ALLOWED_AT_END, None)
        if failed > connections * streams:  # streams cut at the end of the run are fine
            errors["STREAM_FAILED"] = failed
        p50, p99 = latency_figures(latencies)
        # The CPU is read around the whole run; its share of the warm-up is small and alike
        # for every setting.
        used = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
        whole = timing.warmup_s + timing.duration_s
        return PointResult(
            images_per_s=round(len(latencies) * point.images / timing.duration_s, 1),
            requests=len(latencies),
            p50_ms=p50,
            p99_ms=p99,
            errors=errors,
            server_cpu_cores=None if used is None else round(used / whole, 3),
        )

    def close(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)


class PythonClients:
    """benchmarks.measure's closed loop in client processes, one channel (connection) each."""

    name = PYTHON

    def __init__(self, model: str, processes: int) -> None:
        self._model = model
        self._pool = ClientPool(processes)

    def check(self, target: Target, images: int) -> None:
        """Every answer of the closed loop is counted by its code: nothing to check first."""

    def run(self, target: Target, point: LoadPoint, timing: Timing) -> PointResult:
        config = Config(
            label="tune",
            api="kserve",
            model=self._model,
            concurrency=point.concurrency,
            batch=point.images,
        )
        jobs = split_load(target.address, config, timing, self._pool.size)
        cpu_before = target.cpu_seconds()
        self._pool.start(jobs)
        samples = self._pool.collect(START_LEAD_S + timing.bound_s + 30.0)
        cpu_after = target.cpu_seconds()
        sample = pooled(samples, None, at_once=True)
        p50, p99 = latency_figures([1000 * x for x in sample.latencies_s])
        used = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
        whole = timing.warmup_s + timing.duration_s
        requests = len(sample.latencies_s)
        return PointResult(
            images_per_s=round(requests * point.images / timing.duration_s, 1),
            requests=requests,
            p50_ms=p50,
            p99_ms=p99,
            errors=dict(sample.errors),
            server_cpu_cores=None if used is None else round(used / whole, 3),
        )

    def close(self) -> None:
        self._pool.close()


LoadGenerator = H2Load | PythonClients


def median_result(results: Sequence[PointResult]) -> PointResult:
    """One point over several rounds: the median of each figure (errors add up)."""
    errors: collections.Counter[str] = collections.Counter()
    for result in results:
        errors.update(result.errors)
    return PointResult(
        images_per_s=median((r.images_per_s for r in results), 3) or 0.0,
        requests=sum(r.requests for r in results),
        p50_ms=median((r.p50_ms for r in results), 3),
        p99_ms=median((r.p99_ms for r in results), 3),
        errors=dict(errors),
        server_cpu_cores=median((r.server_cpu_cores for r in results), 3),
    )
