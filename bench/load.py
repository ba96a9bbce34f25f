"""Load generator for the server: N concurrent gRPC workers for a bounded time, then statistics.

Measures the native Classifier API or the KServe v2 protocol from the same process, with
requests built once up front so the client spends its CPU on gRPC, not on encoding. With
--start-server it runs the server itself (loopback, port 0) and, with --compare, runs several
server or client configurations one after the other and prints each one's ratio to the first.

  python bench/load.py --server 127.0.0.1:8001 --model fashion_mnist --duration 5
  python bench/load.py --start-server model_repository --model fashion_mnist --duration 5 \\
      --compare "t1=--intra-op-threads 1" "t2=--intra-op-threads 2"
  python bench/load.py --start-server model_repository --model fashion_mnist --duration 5 \\
      --compare "native=--api native" "kserve=--api kserve" --out bench-results/apis.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np

from client.table import format_table

ROOT = Path(__file__).resolve().parent.parent
MAX_CONCURRENCY = 1024
MAX_DURATION_S = 300.0
MAX_WARMUP_S = 60.0
MAX_BATCH = 1024
MAX_CONFIGS = 8
SERVER_START_TIMEOUT_S = 180.0
SERVER_STOP_TIMEOUT_S = 30.0
# The server logs "serving on grpc HOST:PORT ..." once its port is bound.
_GRPC_PORT = re.compile(r"\bgrpc (?:\[[^\]]*\]|[\w.-]+):(\d+)\b")
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]

Call = Callable[[], Awaitable[str]]


class BenchError(Exception):
    """A setup failure reported as one line (bad flags, server that will not start)."""


@dataclass(frozen=True)
class Config:
    label: str
    api: str = "native"
    model: str = "fashion_mnist"
    concurrency: int = 32
    batch: int = 1
    encoding: str = "tensor"
    top_k: int = 5
    server_args: tuple[str, ...] = ()


@dataclass
class Outcome:
    label: str
    config: dict[str, object]
    duration_s: float
    requests: int
    images: int
    requests_per_s: float
    images_per_s: float
    latency_ms: dict[str, float]
    errors: dict[str, int]
    # CPU seconds used per second of measurement (1.0 = one core busy); shows which side saturated.
    client_cores: float
    server_cores: float | None
    rounds_requests_per_s: list[float]
    ratios: dict[str, float] = field(default_factory=dict)


@dataclass
class Sample:
    """What one round of one configuration measured, before summing rounds."""

    latencies_s: list[float]
    errors: collections.Counter[str]
    duration_s: float
    client_cpu_s: float
    server_cpu_s: float | None


# --- requests -------------------------------------------------------------------------------


def _pixels(shape: Sequence[int], batch: int) -> np.ndarray:
    """Fixed pseudo-random pixels: every run and configuration sends the same bytes."""
    return np.random.default_rng(0).random((batch, *shape), dtype=np.float32)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    pixels = (image * 255).round().astype(np.uint8)
    picture = (
        Image.fromarray(pixels[0], "L")
        if pixels.shape[0] == 1
        else Image.fromarray(np.moveaxis(pixels, 0, -1), "RGB")
    )
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def _error_code(error: grpc.RpcError) -> str:
    code = error.code() if hasattr(error, "code") else None
    return code.name if code is not None else "UNKNOWN"


def native_call(
    channel: grpc.aio.Channel, config: Config, shape: Sequence[int], timeout: float
) -> Call:
    from wire import classifier_pb2, classifier_pb2_grpc

    batch = _pixels(shape, config.batch)
    if config.encoding == "png":
        images = [classifier_pb2.Image(encoded=_png(image)) for image in batch]
    else:
        images = [
            classifier_pb2.Image(
                tensor=classifier_pb2.Tensor(
                    shape=list(shape), datatype="FP32", data=image.astype("<f4").tobytes()
                )
            )
            for image in batch
        ]
    request = classifier_pb2.ClassifyRequest(model=config.model, images=images, top_k=config.top_k)
    stub = classifier_pb2_grpc.ClassifierStub(channel)

    async def call() -> str:
        try:
            await stub.Classify(request, timeout=timeout)
        except grpc.RpcError as error:
            return _error_code(error)
        return "OK"

    return call


def kserve_call(
    channel: grpc.aio.Channel, config: Config, shape: Sequence[int], timeout: float
) -> Call:
    """KServe v2 ModelInfer through the standard client's generated stubs."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from modelrepo.layout import INPUT_NAME, OUTPUT_NAME

    batch = _pixels(shape, config.batch)
    request = service_pb2.ModelInferRequest(
        model_name=config.model,
        inputs=[
            service_pb2.ModelInferRequest.InferInputTensor(
                name=INPUT_NAME, datatype="FP32", shape=list(batch.shape)
            )
        ],
        outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=OUTPUT_NAME)],
        raw_input_contents=[batch.astype("<f4").tobytes()],
    )
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

    async def call() -> str:
        try:
            await stub.ModelInfer(request, timeout=timeout)
        except grpc.RpcError as error:
            return _error_code(error)
        return "OK"

    return call


async def _model_shape(channel: grpc.aio.Channel, model: str, wait_s: float) -> tuple[int, ...]:
    """The model's C x H x W, once the server says it is READY (polled for up to wait_s)."""
    from wire import classifier_pb2, classifier_pb2_grpc

    stub = classifier_pb2_grpc.ClassifierStub(channel)
    deadline = time.monotonic() + wait_s
    last = "no answer"
    while True:
        try:
            reply = await stub.ListModels(classifier_pb2.ListModelsRequest(), timeout=5.0)
            found = [m for m in reply.models if m.name == model]
            if not found:
                names = ", ".join(sorted({m.name for m in reply.models})) or "none"
                raise BenchError(f"the server has no model {model!r} (it has: {names})")
            ready = [m for m in found if m.state == "READY"]
            if ready:
                return tuple(ready[-1].input_shape)
            last = f"{model} is {found[-1].state} {found[-1].reason}".strip()
        except grpc.RpcError as error:
            last = f"{_error_code(error)}: {error.details() if hasattr(error, 'details') else ''}"
        if time.monotonic() >= deadline:
            raise BenchError(f"model {model!r} not ready after {wait_s:g} s ({last})")
        await asyncio.sleep(0.2)


# --- load -----------------------------------------------------------------------------------


def _percentiles(latencies_s: list[float]) -> dict[str, float]:
    if not latencies_s:
        return {}
    ms = np.asarray(latencies_s) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "mean": round(float(ms.mean()), 3),
        "max": round(float(ms.max()), 3),
    }


async def run_load(
    target: str,
    config: Config,
    duration_s: float,
    warmup_s: float,
    timeout_s: float,
    ready_wait_s: float,
    server_cpu: Callable[[], float | None] = lambda: None,
) -> Sample:
    """Workers loop until the end; only answers that arrive after the warm-up are counted."""
    async with grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS) as channel:
        shape = await _model_shape(channel, config.model, ready_wait_s)
        make = kserve_call if config.api == "kserve" else native_call
        call = make(channel, config, shape, timeout_s)
        latencies: list[float] = []
        errors: collections.Counter[str] = collections.Counter()
        start = time.perf_counter()
        counted_from = start + warmup_s
        end = counted_from + duration_s

        async def worker() -> None:
            while (sent := time.perf_counter()) < end:
                code = await call()
                done = time.perf_counter()
                if counted_from <= done <= end:
                    if code == "OK":
                        latencies.append(done - sent)
                    else:
                        errors[code] += 1

        async def cpu_meter() -> tuple[float, float | None]:
            await asyncio.sleep(max(counted_from - time.perf_counter(), 0.0))
            client, server = time.process_time(), server_cpu()
            await asyncio.sleep(max(end - time.perf_counter(), 0.0))
            client_after, server_after = time.process_time(), server_cpu()
            used = None if server is None or server_after is None else server_after - server
            return client_after - client, used

        meter = asyncio.ensure_future(cpu_meter())
        workers = [asyncio.ensure_future(worker()) for _ in range(config.concurrency)]
        try:
            # Every worker stops issuing at `end`; the last calls end within their timeout.
            await asyncio.wait_for(asyncio.gather(*workers), warmup_s + duration_s + timeout_s + 5)
            client_cpu, used_by_server = await meter
        finally:
            for task in [*workers, meter]:
                task.cancel()
    return Sample(latencies, errors, duration_s, client_cpu, used_by_server)


def summarize(config: Config, samples: Sequence[Sample]) -> Outcome:
    """Rounds of one configuration add up as if they were one longer run."""
    latencies = [x for sample in samples for x in sample.latencies_s]
    errors: collections.Counter[str] = collections.Counter()
    for sample in samples:
        errors.update(sample.errors)
    duration = sum(sample.duration_s for sample in samples)
    server = [sample.server_cpu_s for sample in samples]
    requests = len(latencies)
    return Outcome(
        label=config.label,
        config={k: v for k, v in asdict(config).items() if k != "label"},
        duration_s=duration,
        requests=requests,
        images=requests * config.batch,
        requests_per_s=round(requests / duration, 2),
        images_per_s=round(requests * config.batch / duration, 2),
        latency_ms=_percentiles(latencies),
        errors=dict(errors),
        client_cores=round(sum(sample.client_cpu_s for sample in samples) / duration, 3),
        server_cores=(
            None if None in server else round(sum(s or 0.0 for s in server) / duration, 3)
        ),
        rounds_requests_per_s=[
            round(len(sample.latencies_s) / sample.duration_s, 2) for sample in samples
        ],
    )


# --- server process -------------------------------------------------------------------------


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    port: int
    tail: collections.deque[str]

    def cpu_seconds(self) -> float | None:
        """User + system CPU of the server so far (Linux /proc); None elsewhere."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None


def parse_grpc_port(line: str) -> int | None:
    match = _GRPC_PORT.search(line)
    return int(match.group(1)) if match else None


@contextmanager
def start_server(repository: Path, extra_args: Sequence[str]) -> Iterator[ServerProcess]:
    """Run `python -m server` on loopback port 0 until the block ends, then stop it (SIGTERM)."""
    command = [
        sys.executable, "-m", "server",
        "--model-repository", str(repository),
        "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
        *extra_args,
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    tail: collections.deque[str] = collections.deque(maxlen=20)
    found = threading.Event()
    port: list[int] = []

    def read() -> None:  # drains the pipe for the server's whole life so it never blocks
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip())
            if not found.is_set() and (value := parse_grpc_port(line)):
                port.append(value)
                found.set()

    reader = threading.Thread(target=read, name="server-output", daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not found.wait(0.1):
            if process.poll() is not None or time.monotonic() > deadline:
                reader.join(1.0)
                code = process.poll()
                why = f"exited with status {code}" if code is not None else "announced no port"
                last = tail[-1].strip() if tail else "no output"
                raise BenchError(f"the server {why} (server args: {' '.join(extra_args)}): {last}")
        yield ServerProcess(process, port[0], tail)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(2.0)


# --- command line ---------------------------------------------------------------------------


def _bounded(kind: type, low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}")
        return value

    return parse


def _add_client_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Options a --compare entry may override; without defaults so overrides are visible."""

    def default(value: object) -> object:
        return value if defaults else None

    parser.add_argument(
        "--model", default=default("fashion_mnist"), help="Model to load (default: %(default)s)."
    )
    parser.add_argument(
        "--api",
        choices=("native", "kserve"),
        default=default("native"),
        help="native Classifier API or KServe v2 ModelInfer (default: %(default)s).",
    )
    parser.add_argument(
        "--concurrency",
        type=_bounded(int, 1, MAX_CONCURRENCY),
        default=default(32),
        help="Workers, each with one request in flight (default: %(default)s).",
    )
    parser.add_argument(
        "--batch",
        type=_bounded(int, 1, MAX_BATCH),
        default=default(1),
        help="Images per request (default: %(default)s).",
    )
    parser.add_argument(
        "--encoding",
        choices=("tensor", "png"),
        default=default("tensor"),
        help="Native API only: send FP32 tensors or PNG files (default: %(default)s).",
    )
    parser.add_argument(
        "--top-k", type=_bounded(int, 0, 1000), default=default(5), help=argparse.SUPPRESS
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python bench/load.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=__doc__.split("\n\n", 2)[2] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", metavar="HOST:PORT", help="Load a running server.")
    where.add_argument(
        "--start-server",
        metavar="REPO",
        type=Path,
        help="Start `python -m server` on this model repository (127.0.0.1, port 0) per run.",
    )
    _add_client_options(parser, defaults=True)
    parser.add_argument(
        "--duration",
        type=_bounded(float, 0.1, MAX_DURATION_S),
        default=10.0,
        help="Seconds measured per configuration (default: %(default)s).",
    )
    parser.add_argument(
        "--warmup",
        type=_bounded(float, 0.0, MAX_WARMUP_S),
        default=1.0,
        help="Seconds of load before measuring (default: %(default)s).",
    )
    parser.add_argument(
        "--timeout",
        type=_bounded(float, 0.1, 120.0),
        default=10.0,
        help="Deadline of each request in seconds (default: %(default)s).",
    )
    parser.add_argument(
        "--server-args",
        default="",
        metavar="ARGS",
        help='Extra flags for the started server, e.g. "--intra-op-threads 2".',
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="LABEL=ARGS",
        help="Run each configuration in turn; ARGS may set --api/--model/--concurrency/--batch/"
        "--encoding, anything else goes to the started server. Ratios are to the first.",
    )
    parser.add_argument(
        "--rounds",
        type=_bounded(int, 1, 10),
        default=1,
        help="Run every configuration this many times, interleaved; rounds add up "
        "(default: %(default)s).",
    )
    parser.add_argument("--out", type=Path, help="Write the results as JSON to this file.")
    return parser


def build_configs(args: argparse.Namespace) -> list[Config]:
    base = Config(
        label="run",
        api=args.api,
        model=args.model,
        concurrency=args.concurrency,
        batch=args.batch,
        encoding=args.encoding,
        top_k=args.top_k,
        server_args=tuple(shlex.split(args.server_args)),
    )
    configs = _compare_configs(args, base) if args.compare else [base]
    for config in configs:
        if config.api == "kserve" and config.encoding != "tensor":
            raise BenchError(f"[{config.label}] the KServe API takes tensors only, not PNG")
    return configs


def _compare_configs(args: argparse.Namespace, base: Config) -> list[Config]:
    if len(args.compare) > MAX_CONFIGS:
        raise BenchError(f"at most {MAX_CONFIGS} --compare entries")
    overrides = argparse.ArgumentParser(prog="--compare", allow_abbrev=False, add_help=False)
    _add_client_options(overrides, defaults=False)
    configs = []
    for entry in args.compare:
        label, sep, rest = entry.partition("=")
        if not sep or not label.strip():
            raise BenchError(f"--compare entry {entry!r} is not LABEL=ARGS")
        try:
            known, server_args = overrides.parse_known_args(shlex.split(rest))
        except (SystemExit, ValueError) as error:
            raise BenchError(f"--compare entry {entry!r} has bad arguments") from error
        if server_args and args.start_server is None:
            raise BenchError(
                f"--compare entry {entry!r} passes server flags {' '.join(server_args)!r}, "
                "which need --start-server"
            )
        if any(config.label == label.strip() for config in configs):
            raise BenchError(f"--compare label {label.strip()!r} is used twice")
        changes = {k: v for k, v in vars(known).items() if v is not None}
        configs.append(
            replace(
                base,
                label=label.strip(),
                server_args=base.server_args + tuple(server_args),
                **changes,
            )
        )
    return configs


def _run_one(args: argparse.Namespace, config: Config) -> Sample:
    def load(target: str, wait_s: float, server_cpu: Callable[[], float | None]) -> Sample:
        return asyncio.run(
            run_load(target, config, args.duration, args.warmup, args.timeout, wait_s, server_cpu)
        )

    if args.start_server is None:
        return load(args.server, 10.0, lambda: None)
    with start_server(args.start_server, config.server_args) as server:
        return load(f"127.0.0.1:{server.port}", SERVER_START_TIMEOUT_S, server.cpu_seconds)


def _add_ratios(outcomes: list[Outcome]) -> None:
    first = outcomes[0]
    for outcome in outcomes:
        pairs = {
            "requests_per_s": (outcome.requests_per_s, first.requests_per_s),
            "images_per_s": (outcome.images_per_s, first.images_per_s),
            "p50": (outcome.latency_ms.get("p50"), first.latency_ms.get("p50")),
            "p99": (outcome.latency_ms.get("p99"), first.latency_ms.get("p99")),
        }
        outcome.ratios = {
            name: round(value / ref, 3) for name, (value, ref) in pairs.items() if value and ref
        }


def format_report(outcomes: list[Outcome]) -> str:
    headers = ["LABEL", "API", "CONC", "BATCH", "REQ/S", "IMG/S", "P50 MS", "P90 MS", "P99 MS"]
    headers += ["ERRORS", "CPU C/S", "X REQ/S", "X P99"]
    rows = []
    for o in outcomes:
        lat = o.latency_ms
        server = "-" if o.server_cores is None else f"{o.server_cores:.2f}"
        errors = ",".join(f"{code}:{n}" for code, n in sorted(o.errors.items())) or "0"
        rows.append(
            [
                o.label,
                o.config["api"],
                o.config["concurrency"],
                o.config["batch"],
                f"{o.requests_per_s:.1f}",
                f"{o.images_per_s:.1f}",
                *(f"{lat[p]:.2f}" if p in lat else "-" for p in ("p50", "p90", "p99")),
                errors,
                f"{o.client_cores:.2f}/{server}",
                f"{o.ratios.get('requests_per_s', 0):.2f}" if o.ratios else "-",
                f"{o.ratios.get('p99', 0):.2f}" if o.ratios else "-",
            ]
        )
    return format_table(headers, rows, right=range(2, len(headers)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.start_server is None and args.server_args:
        parser.error("--server-args needs --start-server")
    if args.start_server is not None and not args.start_server.is_dir():
        parser.error(f"--start-server {args.start_server}: no such directory")
    try:
        configs = build_configs(args)
        samples: dict[str, list[Sample]] = {config.label: [] for config in configs}
        # Rounds interleave the configurations (A B A B) so drift on a shared machine
        # falls on all of them alike instead of on whichever ran last.
        for round_no in range(1, args.rounds + 1):
            for config in configs:
                extra = f" server {' '.join(config.server_args)}" if config.server_args else ""
                print(
                    f"[{config.label} round {round_no}/{args.rounds}] {config.api} {config.model}"
                    f" concurrency {config.concurrency} batch {config.batch} for"
                    f" {args.duration:g} s (+{args.warmup:g} s warm-up){extra}",
                    file=sys.stderr,
                    flush=True,
                )
                samples[config.label].append(_run_one(args, config))
        outcomes = [summarize(config, samples[config.label]) for config in configs]
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    _add_ratios(outcomes)
    print(format_report(outcomes))
    if args.out is not None:
        report = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "target": args.server or f"started server on {args.start_server}",
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "cpu_count": os.cpu_count(),
            "results": [asdict(o) for o in outcomes],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    failed = sum(not o.requests for o in outcomes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
