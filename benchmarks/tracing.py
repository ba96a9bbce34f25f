"""`python -m benchmarks tracing`: what tracing costs. The same server with tracing off, on with
a 1% sampler and on with every request sampled, side by side under the same lean load.

Every configuration is started once and kept running, each tracing server sending its spans to
an OTLP/gRPC receiver of its own in this process (it counts the spans, keeps nothing); the load
is h2load replaying one ModelInfer request without a `traceparent`, so the server's sampler
decides alone. Rounds interleave the configurations, each round in a rotated order, and the
figures are medians over rounds (a noisy machine moves all of them alike). `--baseline DIR`
adds a server run from another checkout (e.g. the code before tracing, with its generated code:
`make proto` there) to compare "off" with. The ratios to compare are paired: each round's
figure over off's in the same round, the median over rounds. Checks as `python -m benchmarks
workers` does: a real gRPC call before each round, no answer but OK in the server's metrics.

  python -m benchmarks tracing --model-repository model_repository --model fashion_mnist
  python -m benchmarks tracing --model-repository R --workers 2 --rounds 7 --duration 10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import operator
import os
import shlex
import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from benchmarks.common import BenchError, exit_code
from benchmarks.h2load import (
    Round,
    Target,
    answer_codes,
    build_request,
    check_answer,
    frame,
    input_shape,
    load_parser,
    measure,
    require_h2load,
)
from benchmarks.options import add_server_args_option
from benchmarks.rounds import medians_by, paired_ratios
from benchmarks.server import start_server

RESULTS_FILE = "results.json"
OFF, BASELINE = "off", "baseline"


class SpanSink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver on loopback that counts the spans it is sent."""

    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.endpoint = f"http://127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        count = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        with self._lock:
            self.spans += count
        return trace_service_pb2.ExportTraceServiceResponse()

    def stop(self) -> None:
        self._server.stop(0)


@dataclass(frozen=True)
class Setup:
    label: str
    args: tuple[str, ...]  # the server's tracing flags
    sink: SpanSink | None
    cwd: Path | None = None  # another checkout (--baseline)


def setups(ratios: Sequence[float], baseline: Path | None) -> list[Setup]:
    found = [Setup(OFF, (), None)]
    for ratio in ratios:
        sink = SpanSink()
        sampler = ("--otel-sampler", "parentbased_always_on")
        if ratio < 1:
            sampler = (
                "--otel-sampler", "parentbased_traceidratio", "--otel-sampler-ratio", f"{ratio:g}",
            )  # fmt: skip
        label = f"{100 * ratio:g}%"
        found.append(Setup(label, ("--otel-endpoint", sink.endpoint, *sampler), sink))
    if baseline is not None:
        found.insert(0, Setup(BASELINE, (), None, baseline))
    return found


# What each round measures of each configuration, as medians and as paired ratios to off.
FIGURES = ("requests_per_s", "cpu_ms_per_request")


def format_table(
    medians: dict[str, dict[str, float]],
    paired: dict[str, dict[str, float]],
    spans: dict[str, float],
) -> str:
    """Medians, and the paired ratios to off (the figures to compare: a round's measurements
    are seconds apart, so a shared machine's drift cancels in them)."""
    lines = [
        f"{'tracing':<10}{'req/s':>9}{'cpu ms/req':>12}{'req/s vs off':>14}"
        f"{'cpu vs off':>12}{'spans/req':>11}"
    ]
    for label, m in medians.items():
        per = spans.get(label)
        lines.append(
            f"{label:<10}{m['requests_per_s']:>9.0f}{m['cpu_ms_per_request']:>12.3f}"
            f"{paired[label]['requests_per_s']:>14.3f}{paired[label]['cpu_ms_per_request']:>12.3f}"
            f"{'-' if per is None else f'{per:.3f}':>11}"
        )
    return "\n".join(lines)


def _ratios(text: str) -> list[float]:
    try:
        ratios = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ratios like 0.01,1, got {text!r}") from None
    if not ratios or not all(0 < r <= 1 for r in ratios):
        raise argparse.ArgumentTypeError("each ratio must be in (0, 1]")
    return ratios


def build_parser() -> argparse.ArgumentParser:
    parser = load_parser("python -m benchmarks tracing", __doc__, rounds=5)
    parser.add_argument(
        "--ratios",
        type=_ratios,
        default=[0.01, 1.0],
        help="Sampled fractions to run beside tracing off (default: 0.01,1).",
    )
    parser.add_argument("--workers", type=int, default=1, help="Worker processes (default: 1).")
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="CHECKOUT",
        help="Also serve from this checkout (its own code, same flags) as 'baseline'.",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmark-results/tracing"))
    add_server_args_option(parser, "every started server")
    return parser


def run(args: argparse.Namespace) -> int:
    require_h2load()
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        if os.environ.get(name, "").strip():
            raise BenchError(f"unset {name}: it would turn tracing on in the 'off' server")
    shape = input_shape(args.model_repository, args.model)
    request = build_request(args.model, shape, args.images)
    args.out.mkdir(parents=True, exist_ok=True)
    frame_file = args.out / "request.grpc"
    frame_file.write_bytes(frame(request))
    extra = ("--workers", str(args.workers), *shlex.split(args.server_args))
    configured = setups(args.ratios, args.baseline)
    rounds: list[list[Round]] = []
    answered: dict[str, float] = {}
    try:
        with contextlib.ExitStack() as stack:
            targets: list[Target] = []
            for setup in configured:
                served = stack.enter_context(
                    start_server(args.model_repository, (*extra, *setup.args), cwd=setup.cwd)
                )
                codes = answer_codes(served.metrics_url)
                targets.append(
                    Target(setup.label, args.workers, served.target, served.cpu_seconds, codes)  # type: ignore[arg-type]
                )
            print(
                f"{len(targets)} servers up ({', '.join(s.label for s in configured)}); "
                f"{args.rounds} rounds of {args.duration:g} s, {args.connections} connections "
                f"x {args.streams} streams, {args.images} image(s), {args.workers} worker(s)",
                flush=True,
            )
            for number in range(args.rounds):
                shift = number % len(targets)
                rounds.append([])
                for target in targets[shift:] + targets[:shift]:
                    check_answer(target.address, request, args.images)
                    one = measure(target, frame_file, args)
                    rounds[-1].append(one)
                    print(
                        f"round {number + 1}: {one.kind:<9} {one.requests_per_s:8.0f} req/s, "
                        f"{one.cpu_ms_per_request:.3f} ms/req",
                        flush=True,
                    )
            for target in targets:
                assert target.codes is not None
                answered[target.kind] = float(target.codes().get("OK", 0))
        # The servers are stopped: each sent its last spans on the way out.
    finally:
        for setup in configured:
            if setup.sink is not None:
                setup.sink.stop()
    spans = {
        s.label: s.sink.spans / max(answered.get(s.label, 0), 1)
        for s in configured
        if s.sink is not None
    }
    kind = operator.attrgetter("kind")
    medians = medians_by([r for one_round in rounds for r in one_round], kind, FIGURES)
    paired = paired_ratios(rounds, kind, OFF, FIGURES)
    print(format_table(medians, paired, spans))
    results = {
        "model": args.model,
        "workers": args.workers,
        "images_per_request": args.images,
        "connections": args.connections,
        "streams": args.streams,
        "duration_s": args.duration,
        "server_args": list(extra),
        "setups": [{"label": s.label, "args": list(s.args)} for s in configured],
        "rounds": [[asdict(r) for r in one_round] for one_round in rounds],
        "medians": medians,
        "paired_ratios_to_off": paired,
        "spans_per_request": spans,
    }
    (args.out / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / RESULTS_FILE}")
    return 0


def main(argv: Sequence[str]) -> int:
    return exit_code(run, build_parser().parse_args(argv))
