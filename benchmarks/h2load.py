"""h2load, a lean C load generator, against a started server (or the do-nothing server,
benchmarks.bare): one framed ModelInfer request replayed over many connections and streams
at a fraction of a Python client's CPU.

h2load checks HTTP statuses only (a gRPC error still arrives as HTTP 200), so answers are
checked apart: a real gRPC client's call (check_answer), and the server's own count of its
answers by status code (answer_codes). Used by the workers sweep, the tracing benchmark and
the tuner.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.bare import READY_LINE
from benchmarks.common import BenchError
from benchmarks.options import bounded
from benchmarks.server import tree_cpu_seconds
from wire import grpc_service_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
PATH = "/inference.GRPCInferenceService/ModelInfer"
STATISTICS_PATH = "/inference.GRPCInferenceService/ModelStatistics"
SERVED, BARE = "served", "do-nothing"
# The served server under the same load over one connection: what one channel gets.
ONE_CONNECTION = "served, 1 conn"
_FINISHED = re.compile(r"finished in [\d.]+s, ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed"
)


MISSING = "h2load not found: install it (Debian/Ubuntu: apt-get install nghttp2-client)"


def require_h2load() -> None:
    if shutil.which("h2load") is None:
        raise BenchError(MISSING)


def load_parser(prog: str, doc: str | None, rounds: int) -> argparse.ArgumentParser:
    """An h2load benchmark's parser: its module doc (up to the usage examples) as the
    description, and the model and the load that h2load puts on it."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(doc or "").split("\n\n  python")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", default="fashion_mnist", help="(default: %(default)s)")
    parser.add_argument("--images", type=int, default=1, help="Images per request (default: 1).")
    parser.add_argument(
        "--connections", type=int, default=8, help="h2load connections (default: 8)."
    )
    parser.add_argument(
        "--streams", type=int, default=8, help="Concurrent streams per connection (default: 8)."
    )
    parser.add_argument("--duration", type=bounded(float, 1, 300), default=10.0)
    parser.add_argument("--warmup", type=bounded(float, 0.5, 60), default=2.0)
    parser.add_argument(
        "--rounds", type=int, default=rounds, help=f"Interleaved rounds (default: {rounds})."
    )
    return parser


@dataclass(frozen=True)
class Round:
    kind: str  # SERVED | BARE
    workers: int
    requests_per_s: float
    succeeded: int
    failed: int
    server_cpu_s: float  # over the measured window
    duration_s: float

    @property
    def cpu_cores(self) -> float:
        return self.server_cpu_s / self.duration_s

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.server_cpu_s / max(self.requests_per_s * self.duration_s, 1)


@dataclass
class Target:
    kind: str
    workers: int
    address: str
    cpu_seconds: Callable[[], float]
    codes: Callable[[], collections.Counter[str]] | None  # answers by code (served only)
    connections: int = 0  # 0: --connections x --streams; 1: all those streams on one

    def load(self, args: argparse.Namespace) -> tuple[int, int]:
        """(connections, streams per connection) of h2load for this target."""
        if self.connections == 1:
            return 1, args.connections * args.streams
        return args.connections, args.streams


def frame(request: pb.ModelInferRequest) -> bytes:
    """One gRPC message as it travels: uncompressed flag, 4-byte big-endian length, bytes."""
    body = request.SerializeToString()
    return b"\x00" + struct.pack(">I", len(body)) + body


def build_request(model: str, shape: Sequence[int], images: int) -> pb.ModelInferRequest:
    pixels = np.random.default_rng(0).random((images, *shape), np.float32)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes())
    return request


def infer_once(address: str, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """A real gRPC client's call with the replayed request; BenchError when refused."""
    with grpc.insecure_channel(address) as channel:
        infer = channel.unary_unary(
            PATH,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        try:
            return infer(request, timeout=30)
        except grpc.RpcError as exc:
            raise BenchError(
                f"{address} refused the benchmark's request for {request.model_name!r}: "
                f"{exc.details()}"
            ) from None


def check_answer(address: str, request: pb.ModelInferRequest, images: int) -> None:
    """The replayed request answered with N rows of probabilities."""
    response = infer_once(address, request)
    rows = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(-1, 10)
    if rows.shape[0] != images or not np.allclose(rows.sum(axis=1), 1, atol=1e-3):
        raise BenchError(f"{address} answered {rows.shape[0]} rows that are not probabilities")


# The statistics extension's per-request stages, in the order a request passes them.
STAGES = ("queue", "compute_input", "compute_infer", "compute_output")
# What the request's whole time inside the server is called there (arrival to answer encoded).
INSIDE = "success"


@dataclass(frozen=True)
class Lone:
    """Requests sent one at a time (concurrency 1)."""

    p50_ms: float
    p99_ms: float
    # Mean microseconds per request inside the server, by stage (STAGES and INSIDE), from its
    # statistics extension over the timed calls; None when not asked for.
    inside_us: dict[str, float] | None = None


def lone_latency(
    address: str, request: pb.ModelInferRequest, calls: int, *, inside: bool = False
) -> Lone:
    """`calls` requests sent one at a time; with `inside`, also where each spent its time in
    the server (what the client waits beyond that is transport, client and scheduling)."""
    with grpc.insecure_channel(address) as channel:
        infer = channel.unary_unary(
            PATH,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        statistics = channel.unary_unary(
            STATISTICS_PATH,
            request_serializer=pb.ModelStatisticsRequest.SerializeToString,
            response_deserializer=pb.ModelStatisticsResponse.FromString,
        )

        def counted() -> dict[str, tuple[int, int]]:
            asked = pb.ModelStatisticsRequest(name=request.model_name)
            model = statistics(asked, timeout=30).model_stats[0].inference_stats
            return {
                stage: (getattr(model, stage).count, getattr(model, stage).ns)
                for stage in (INSIDE, *STAGES)
            }

        for _ in range(20):  # warm: the connection, the server's caches
            infer(request, timeout=30)
        before = counted() if inside else {}
        times = []
        for _ in range(calls):
            began = time.perf_counter()
            infer(request, timeout=30)
            times.append(time.perf_counter() - began)
        after = counted() if inside else {}
    p50, p99 = np.percentile(times, [50, 99])
    stages = None
    if inside:
        stages = {
            stage: (after[stage][1] - before[stage][1])
            / max(after[stage][0] - before[stage][0], 1)
            / 1000
            for stage in before
        }
    return Lone(1000 * float(p50), 1000 * float(p99), stages)


def h2load_time(seconds: float) -> str:
    """A duration as h2load reads it: it refuses fractions of a second ("0.5"), not "500ms"."""
    return f"{round(seconds * 1000)}ms"


def run_h2load(
    target: Target, frame_file: Path, args: argparse.Namespace
) -> tuple[float, int, int]:
    """(req/s, succeeded, failed) of one h2load run against `target`."""
    address = target.address
    connections, streams = target.load(args)
    command = [
        "h2load", "-c", str(connections), "-m", str(streams), "-t", "1",
        f"--duration={h2load_time(args.duration)}", f"--warm-up-time={h2load_time(args.warmup)}",
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        "-d", str(frame_file), f"http://{address}{PATH}",
    ]  # fmt: skip
    limit = args.duration + args.warmup + 30
    done = subprocess.run(command, capture_output=True, text=True, timeout=limit, check=False)
    finished, counts = _FINISHED.search(done.stdout), _REQUESTS.search(done.stdout)
    if done.returncode != 0 or finished is None or counts is None:
        raise BenchError(f"h2load failed against {address}:\n{done.stdout[-800:]}{done.stderr}")
    return float(finished[1]), int(counts[2]), int(counts[3])


def measure(target: Target, frame_file: Path, args: argparse.Namespace) -> Round:
    codes_before = target.codes() if target.codes else collections.Counter()
    marks: list[tuple[float, float]] = []
    timer = threading.Timer(
        args.warmup, lambda: marks.append((time.monotonic(), target.cpu_seconds()))
    )
    timer.start()
    rate, succeeded, failed = run_h2load(target, frame_file, args)
    timer.join()
    began, cpu_began = marks[0]
    elapsed, cpu = time.monotonic() - began, target.cpu_seconds() - cpu_began
    if target.codes is not None:
        codes = target.codes()
        codes.subtract(codes_before)
        # h2load cancels what is in flight when its time is up: at most one per stream.
        cancelled = codes.pop("CANCELLED", 0)
        codes.pop("OK", None)
        wrong = {code: n for code, n in codes.items() if n}
        if wrong or cancelled > args.connections * args.streams:
            raise BenchError(
                f"{target.kind} x{target.workers} answered other than OK: "
                f"{dict(wrong, CANCELLED=cancelled)}"
            )
    return Round(target.kind, target.workers, rate, succeeded, failed, cpu, elapsed)


def answer_codes(metrics_url: str) -> Callable[[], collections.Counter[str]]:
    """The server's answers so far by status code, from its imgserve_requests_total."""

    def count() -> collections.Counter[str]:
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            text = response.read().decode()
        codes: collections.Counter[str] = collections.Counter()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "imgserve_requests_total":
                    codes[sample.labels.get("code", "")] += int(sample.value)
        return codes

    return count


@contextlib.contextmanager
def start_bare(workers: int, transport: str = "grpcio", kind: str = BARE) -> Iterator[Target]:
    """The do-nothing server (benchmarks.bare) on `transport` (grpcio or native)."""
    command = [
        sys.executable, "-m", "benchmarks.bare", "--workers", str(workers),
        "--transport", transport,
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith(READY_LINE):
            raise BenchError(f"the do-nothing server did not start: {line!r}")
        address = f"127.0.0.1:{int(line[len(READY_LINE) :])}"
        yield Target(kind, workers, address, lambda: tree_cpu_seconds(process.pid), None)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


def input_shape(repository: Path, model: str) -> tuple[int, ...]:
    from modelrepo.config import load_config
    from modelrepo.layout import CONFIG_FILE

    path = repository / model / CONFIG_FILE
    try:
        config = load_config(path)
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read {path}: {exc}") from None
    return tuple(int(d) for d in config.input[0].dims)
