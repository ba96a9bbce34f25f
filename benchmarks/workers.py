"""`python -m benchmarks workers`: req/s and server CPU per request against --workers, with a
lean C load generator, beside the do-nothing server (benchmarks.bare) with as many processes.

A Python client shares the machine's cores with the server and spends more CPU per call than
the server does; h2load (Debian's `nghttp2-client`) replays one framed ModelInfer request over
many connections and streams at a fraction of that. It checks HTTP statuses only (a gRPC error
still arrives as HTTP 200), so every round is checked separately: a real gRPC client's call
gets a well-formed answer before it, and the server's own /metrics must count no answer other
than OK during it. Connections, not requests, are spread over workers, so the load uses
several (--connections).

Every configuration (served and do-nothing, at each worker count) is started once and kept
running; the rounds interleave them, and the figures are the medians over rounds, so that a
noisy machine moves all of them alike. Results: a table, results.json and workers.png in --out.
With --transport grpcio,native every server (served and do-nothing) runs on each gRPC transport
(the server's --grpc-transport, benchmarks.bare's --transport), named "TRANSPORT: server", and
the table adds native's req/s over grpcio's.

  python -m benchmarks workers --model-repository model_repository --model fashion_mnist
  python -m benchmarks workers --model-repository model_repository --model cifar10 \\
      --workers 1,2,4,8 --images 8 --rounds 5
  python -m benchmarks workers --model-repository model_repository --workers 1 \\
      --transport grpcio,native
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import shlex
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.common import exit_code
from benchmarks.h2load import (
    BARE,
    INSIDE,
    ONE_CONNECTION,
    SERVED,
    STAGES,
    Lone,
    Round,
    Target,
    answer_codes,
    build_request,
    check_answer,
    frame,
    input_shape,
    load_parser,
    lone_latency,
    measure,
    require_h2load,
    start_bare,
)
from benchmarks.options import add_server_args_option
from benchmarks.plots import write_workers_plot
from benchmarks.rounds import median, medians_by
from benchmarks.server import start_server

RESULTS_FILE = "results.json"
# What each round measures of each server, as medians over rounds.
FIGURES = ("requests_per_s", "cpu_cores", "cpu_ms_per_request")
TRANSPORTS = ("grpcio", "native")


def _named(kind: str, transport: str, several: bool) -> str:
    """A server's name: its kind, after its transport when several transports are measured."""
    return f"{transport}: {kind}" if several else kind


def _kind(name: str) -> tuple[str, str]:
    """(transport, kind) of a server's name (transport "" when only one was measured)."""
    transport, _, kind = name.rpartition(": ")
    return transport, kind


def _median_rounds(rounds: Sequence[Round]) -> dict[tuple[str, int], dict[str, float]]:
    """Per server and worker count, in that order, each figure's median over rounds."""
    found = medians_by(rounds, lambda r: (r.kind, r.workers), FIGURES)
    return dict(sorted(found.items()))


def format_table(medians: dict[tuple[str, int], dict[str, float]]) -> str:
    several = any(_kind(name)[0] for name, _ in medians)
    lines = [
        f"{'server':<24}{'workers':>8}{'req/s':>10}{'cores':>8}{'cpu ms/req':>12}"
        f"{'vs 1 worker':>13}{'vs do-nothing':>15}" + (f"{'vs grpcio':>11}" if several else "")
    ]

    def ratio(m: dict[str, float], base: dict[str, float] | None) -> str:
        return f"{m['requests_per_s'] / base['requests_per_s']:.2f}x" if base else "-"

    for (name, workers), m in medians.items():
        transport, kind = _kind(name)
        prefix = f"{transport}: " if transport else ""
        one = medians.get((prefix + (SERVED if kind == ONE_CONNECTION else kind), 1))
        bare = medians.get((prefix + BARE, workers)) if kind != BARE else None
        line = (
            f"{name:<24}{workers:>8}{m['requests_per_s']:>10.0f}{m['cpu_cores']:>8.2f}"
            f"{m['cpu_ms_per_request']:>12.3f}{ratio(m, one):>13}{ratio(m, bare):>15}"
        )
        if several:
            grpcio = medians.get((f"grpcio: {kind}", workers)) if transport != "grpcio" else None
            line += f"{ratio(m, grpcio):>11}"
        lines.append(line)
    return "\n".join(lines)


def _transports(text: str) -> list[str]:
    chosen = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [t for t in chosen if t not in TRANSPORTS]
    if not chosen or unknown:
        raise argparse.ArgumentTypeError(f"expected {' and/or '.join(TRANSPORTS)}, got {text!r}")
    return chosen


def _counts(text: str) -> list[int]:
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,2,4, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError("worker counts must be at least 1")
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = load_parser("python -m benchmarks workers", __doc__, rounds=3)
    parser.add_argument(
        "--workers", type=_counts, default=[1, 2], help="Worker counts (default: 1,2)."
    )
    parser.add_argument(
        "--transport",
        type=_transports,
        default=["native"],
        help="gRPC transports to serve on, each server on each: grpcio, native or grpcio,native "
        "(default: native, the server's own default without TLS).",
    )
    parser.add_argument("--no-bare", action="store_true", help="Skip the do-nothing server.")
    parser.add_argument(
        "--lone-calls",
        type=int,
        default=300,
        help="Per round, requests sent one at a time to each 1-worker server for the latency "
        "at concurrency 1 (0: skip; default: %(default)s).",
    )
    parser.add_argument(
        "--no-single-connection",
        action="store_true",
        help="Skip the same load over one connection (what a one-channel client gets).",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmark-results/workers"))
    add_server_args_option(parser, "the served server")
    return parser


def _lone_medians(values: Sequence[Lone]) -> dict[str, Any]:
    """Medians over rounds of the concurrency-1 figures (and of each stage inside the server)."""
    figures: dict[str, Any] = {
        "p50_ms": median(v.p50_ms for v in values),
        "p99_ms": median(v.p99_ms for v in values),
    }
    inside = [v.inside_us for v in values if v.inside_us is not None]
    if inside:
        figures["inside_us"] = {stage: median(one[stage] for one in inside) for stage in inside[0]}
    return figures


def _inside(stages: dict[str, float] | None) -> str:
    """`; inside the server 545 us (queue 75, compute_input 84, ...)`, or nothing."""
    if stages is None:
        return ""
    parts = ", ".join(f"{stage} {stages[stage]:.0f}" for stage in STAGES)
    return f"; inside the server {stages[INSIDE]:.0f} us ({parts})"


def run(args: argparse.Namespace) -> int:
    require_h2load()
    shape = input_shape(args.model_repository, args.model)
    request = build_request(args.model, shape, args.images)
    args.out.mkdir(parents=True, exist_ok=True)
    frame_file = args.out / "request.grpc"
    frame_file.write_bytes(frame(request))
    server_args = tuple(shlex.split(args.server_args))
    rounds: list[Round] = []
    several = len(args.transport) > 1
    with contextlib.ExitStack() as stack:
        targets: list[Target] = []
        for transport, workers in ((t, w) for t in args.transport for w in args.workers):
            flags = ("--workers", str(workers), "--grpc-transport", transport, *server_args)
            served = stack.enter_context(start_server(args.model_repository, flags))
            codes, cpu = answer_codes(served.metrics_url), served.cpu_seconds
            name = _named(SERVED, transport, several)
            targets.append(Target(name, workers, served.target, cpu, codes))  # type: ignore[arg-type]
            if workers > 1 and not args.no_single_connection:
                name = _named(ONE_CONNECTION, transport, several)
                twin = Target(name, workers, served.target, cpu, codes, 1)  # type: ignore[arg-type]
                targets.append(twin)
            if not args.no_bare:
                bare = start_bare(workers, transport, _named(BARE, transport, several))
                targets.append(stack.enter_context(bare))
        print(
            f"{len(targets)} servers up; {args.rounds} rounds of {args.duration:g} s each, "
            f"{args.connections} connections x {args.streams} streams, {args.images} image(s)",
            flush=True,
        )
        lone: dict[str, list[Lone]] = collections.defaultdict(list)
        for number in range(1, args.rounds + 1):
            for target in targets:
                if args.lone_calls and target.workers == 1:
                    served_kind = _kind(target.kind)[1] == SERVED
                    alone = lone_latency(
                        target.address, request, args.lone_calls, inside=served_kind
                    )
                    lone[target.kind].append(alone)
                    figures = f"p50 {alone.p50_ms:.3f} ms, p99 {alone.p99_ms:.3f} ms"
                    print(
                        f"round {number}: {target.kind:<10} concurrency 1: {figures}"
                        f"{_inside(alone.inside_us)}",
                        flush=True,
                    )
                check_answer(target.address, request, args.images)
                one = measure(target, frame_file, args)
                rounds.append(one)
                print(
                    f"round {number}: {one.kind:<10} x{one.workers}: {one.requests_per_s:8.0f} "
                    f"req/s, {one.cpu_cores:.2f} cores, {one.cpu_ms_per_request:.3f} ms/req",
                    flush=True,
                )
    medians = _median_rounds(rounds)
    print(format_table(medians))
    latency = {kind: _lone_medians(values) for kind, values in lone.items()}
    for kind, figures in latency.items():
        print(
            f"concurrency 1, {kind}: p50 {figures['p50_ms']:.3f} ms, p99 {figures['p99_ms']:.3f} "
            f"ms{_inside(figures.get('inside_us'))}"
        )
    for transport in args.transport:
        served, bare = (_named(kind, transport, several) for kind in (SERVED, BARE))
        if served in latency and bare in latency:
            extra = latency[served]["p50_ms"] - latency[bare]["p50_ms"]
            print(f"concurrency 1: {served} p50 is {extra:+.3f} ms from {bare}'s")
    title = (
        f"{args.model}, {args.images} image(s)/request, h2load {args.connections}x{args.streams}"
    )
    plot = write_workers_plot(args.out, medians, title)
    results = {
        "model": args.model,
        "images_per_request": args.images,
        "connections": args.connections,
        "streams": args.streams,
        "duration_s": args.duration,
        "server_args": list(server_args),
        "transports": args.transport,
        "rounds": [asdict(r) for r in rounds],
        "concurrency_1": latency,
        "medians": [{"server": k, "workers": w, **m} for (k, w), m in medians.items()],
    }
    (args.out / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / RESULTS_FILE} and {plot}")
    return 0


def main(argv: Sequence[str]) -> int:
    return exit_code(run, build_parser().parse_args(argv))
