"""`python -m benchmarks compare`: configurations side by side, each a closed-loop load.

Measures the native Classifier API or the KServe v2 protocol, unary or streaming (answers
matched to requests by id), with requests built once up front so the client spends its CPU
on gRPC, not on encoding. With --model-repository it runs the server itself (loopback,
port 0) for each configuration and prints each one's ratio to the first.

  python -m benchmarks compare --server 127.0.0.1:8001 --model fashion_mnist --duration 5
  python -m benchmarks compare --model-repository model_repository --duration 5 \\
      --compare "t1=--intra-op-threads 1" "t2=--intra-op-threads 2"
  python -m benchmarks compare --model-repository model_repository --duration 5 \\
      --compare "native=--api native" "kserve=--api kserve" --out benchmark-results/apis.json
  python -m benchmarks compare --server 127.0.0.1:8001 --api native-stream --concurrency 64 \\
      --streams 4
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from benchmarks.common import BenchError, Config, Sample, exit_code
from benchmarks.figures import write_report
from benchmarks.measure import Timing, measure_started, run_load
from benchmarks.modes import APIS, STREAM_APIS
from benchmarks.options import (
    MAX_BATCH,
    MAX_CONCURRENCY,
    add_server_args_option,
    add_timing_options,
    bounded,
)
from benchmarks.report import add_ratios, format_report, summarize
from benchmarks.server import start_server

MAX_CONFIGS = 8


# --- command line ---------------------------------------------------------------------------


def _add_client_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Options a --compare entry may override; without defaults so overrides are visible."""

    def default(value: object) -> object:
        return value if defaults else None

    parser.add_argument(
        "--model", default=default("fashion_mnist"), help="Model to load (default: %(default)s)."
    )
    parser.add_argument(
        "--api",
        choices=APIS,
        default=default("native"),
        help="native Classify, KServe v2 ModelInfer, or their streams: native ClassifyStream, "
        "KServe ModelStreamInfer (default: %(default)s).",
    )
    parser.add_argument(
        "--concurrency",
        type=bounded(int, 1, MAX_CONCURRENCY),
        default=default(32),
        help="Workers, each with one request in flight (default: %(default)s).",
    )
    parser.add_argument(
        "--streams",
        type=bounded(int, 1, MAX_CONCURRENCY),
        default=default(1),
        help="Stream APIs only (the unary ones ignore it): streams the workers share, each "
        "carrying its share of the concurrency (default: %(default)s).",
    )
    parser.add_argument(
        "--batch",
        type=bounded(int, 1, MAX_BATCH),
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
        "--top-k", type=bounded(int, 0, 1000), default=default(5), help=argparse.SUPPRESS
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks compare",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=__doc__.split("\n\n", 2)[2] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", metavar="HOST:PORT", help="Load a running server.")
    where.add_argument(
        "--model-repository",
        metavar="REPO",
        type=Path,
        help="Start `python -m server --model-repository REPO` (127.0.0.1, port 0) for each "
        "configuration and round, and stop it after.",
    )
    _add_client_options(parser, defaults=True)
    add_timing_options(
        parser,
        (10.0, "Seconds measured per configuration (default: %(default)s)."),
        (1.0, "Seconds of load before measuring (default: %(default)s)."),
    )
    add_server_args_option(parser, "the started server")
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="LABEL=ARGS",
        help="Run each configuration in turn; ARGS may set --api/--model/--concurrency/--streams/"
        "--batch/--encoding, anything else goes to the started server. Ratios are to the first.",
    )
    parser.add_argument(
        "--rounds",
        type=bounded(int, 1, 10),
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
        streams=args.streams,
        batch=args.batch,
        encoding=args.encoding,
        top_k=args.top_k,
        server_args=tuple(shlex.split(args.server_args)),
    )
    configs = _compare_configs(args, base) if args.compare else [base]
    # A unary API has no streams; 1 keeps the JSON from claiming otherwise.
    configs = [c if c.api in STREAM_APIS else replace(c, streams=1) for c in configs]
    for config in configs:
        if config.api.startswith("kserve") and config.encoding != "tensor":
            raise BenchError(f"[{config.label}] the KServe API takes tensors only, not PNG")
        if config.streams > config.concurrency:
            raise BenchError(
                f"[{config.label}] --streams {config.streams} is more than --concurrency "
                f"{config.concurrency}: a stream would carry no request"
            )
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
        if server_args and args.model_repository is None:
            raise BenchError(
                f"--compare entry {entry!r} passes server flags {' '.join(server_args)!r}, "
                "which need --model-repository"
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
    timing = Timing(args.warmup, args.duration, args.timeout)
    if args.model_repository is None:
        return asyncio.run(run_load(args.server, config, timing))
    with start_server(args.model_repository, config.server_args) as server:
        return measure_started(server, config, timing)


def run(args: argparse.Namespace) -> int:
    configs = build_configs(args)
    samples: dict[str, list[Sample]] = {config.label: [] for config in configs}
    # Rounds interleave the configurations (A B A B) so drift on a shared machine
    # falls on all of them alike instead of on whichever ran last.
    for round_no in range(1, args.rounds + 1):
        for config in configs:
            extra = f" server {' '.join(config.server_args)}" if config.server_args else ""
            if config.api in STREAM_APIS:
                extra = f" over {config.streams} stream(s){extra}"
            print(
                f"[{config.label} round {round_no}/{args.rounds}] {config.api} {config.model}"
                f" concurrency {config.concurrency} batch {config.batch} for"
                f" {args.duration:g} s (+{args.warmup:g} s warm-up){extra}",
                file=sys.stderr,
                flush=True,
            )
            samples[config.label].append(_run_one(args, config))
    outcomes = [summarize(config, samples[config.label]) for config in configs]
    add_ratios(outcomes)
    print(format_report(outcomes))
    if args.out is not None:
        target = args.server or f"started server on {args.model_repository}"
        write_report(
            args.out,
            {
                "target": target,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "rounds": args.rounds,
                "results": [asdict(o) for o in outcomes],
            },
        )
        print(f"wrote {args.out}", file=sys.stderr)
    failed = sum(not o.requests for o in outcomes)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model_repository is None and args.server_args:
        parser.error("--server-args needs --model-repository")
    if args.model_repository is not None and not args.model_repository.is_dir():
        parser.error(f"--model-repository {args.model_repository}: no such directory")
    return exit_code(run, args)
