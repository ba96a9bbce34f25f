"""Command-line options every benchmark shares, so that the same flag takes the same values and
says the same thing in each command's --help."""

from __future__ import annotations

import argparse
from collections.abc import Callable

MAX_CONCURRENCY = 1024
MAX_BATCH = 1024
MAX_DURATION_S = 300.0
MAX_WARMUP_S = 60.0

Parser = argparse.ArgumentParser | argparse._ArgumentGroup


def bounded(kind: type, low: float, high: float) -> Callable[[str], float]:
    """An argparse type: `kind(text)` within [low, high], or a one-line usage error."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}")
        return value

    return parse


def add_timing_options(
    parser: Parser, duration: tuple[float | None, str], warmup: tuple[float | None, str]
) -> None:
    """--duration and --warmup (each a default and its help), and --timeout."""
    parser.add_argument(
        "--duration",
        type=bounded(float, 0.1, MAX_DURATION_S),
        default=duration[0],
        help=duration[1],
    )
    parser.add_argument(
        "--warmup", type=bounded(float, 0.0, MAX_WARMUP_S), default=warmup[0], help=warmup[1]
    )
    parser.add_argument(
        "--timeout",
        type=bounded(float, 0.1, 120.0),
        default=10.0,
        help="Deadline of each request in seconds (default: %(default)s).",
    )


def add_server_args_option(parser: Parser, servers: str) -> None:
    """--server-args: flags passed through to the servers the benchmark starts."""
    parser.add_argument(
        "--server-args",
        default="",
        metavar="ARGS",
        help=f"Extra flags for {servers}, written with '=' because they start with a dash: "
        '--server-args="--intra-op-threads 2".',
    )
