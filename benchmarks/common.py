"""What the parts of the load generator share: one configuration, one round's numbers, errors."""

from __future__ import annotations

import collections
from dataclasses import dataclass


class BenchError(Exception):
    """A setup failure reported as one line (bad flags, server that will not start)."""


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
