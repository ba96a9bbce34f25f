"""What the parts of the load generator share: one configuration, one round's numbers, errors."""

from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Callable
from dataclasses import dataclass, field


class BenchError(Exception):
    """A setup failure reported as one line (bad flags, server that will not start)."""


def exit_code(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`run(args)`'s exit status; a BenchError or Ctrl-C as one line on stderr, no traceback."""
    try:
        return run(args)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


@dataclass(frozen=True)
class Config:
    label: str
    api: str = "native"
    model: str = "fashion_mnist"
    concurrency: int = 32
    # Stream modes only: the concurrency is spread over this many streams.
    streams: int = 1
    batch: int = 1
    encoding: str = "tensor"
    top_k: int = 5
    server_args: tuple[str, ...] = ()


@dataclass
class Sample:
    """What one round of one configuration measured, before summing rounds."""

    latencies_s: list[float]
    errors: collections.Counter[str]
    duration_s: float
    client_cpu_s: float
    server_cpu_s: float | None
    # Most requests in flight at once (client processes sharing a window: their sum).
    peak_in_flight: int = 0
    # Per client process: seconds its load began after the agreed start (0.0 when on time).
    start_late_s: tuple[float, ...] = field(default_factory=tuple)
