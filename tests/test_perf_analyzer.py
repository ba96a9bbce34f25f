"""Triton's perf_analyzer against the server, over gRPC and HTTP, with two workers.

perf_analyzer is the load generator Triton users benchmark with: it reads the model's
metadata and configuration, drives inference, and reads ModelStatistics before and after each
measurement, refusing a server whose compute counts differ ("Server side statistics compute
counts must be the same"). `make test` prepares it (deploy/ci/prepare-perf-analyzer.sh); without
it these tests skip, saying why (under CI they fail).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from deploy_tools import unavailable
from server_process import PROJECT_ROOT, ServerProcess

pytestmark = pytest.mark.both_transports
PERF_ANALYZER = PROJECT_ROOT / ".venv" / "perf-analyzer" / "perf_analyzer"
# "Avg request latency: 481 usec (overhead 136 usec + queue 109 usec + compute input 65 usec
#  + compute infer 140 usec + compute output 29 usec)", one per measured concurrency.
SERVER_LATENCY = re.compile(
    r"queue (\d+) usec \+ compute input (\d+) usec \+ compute infer (\d+) usec"
    r" \+ compute output (\d+) usec"
)
THROUGHPUT = re.compile(r"Concurrency: (\d+), throughput: ([\d.]+) infer/sec")


@pytest.fixture(scope="module")
def perf_analyzer() -> Path:
    if not PERF_ANALYZER.is_file():
        unavailable(
            f"perf_analyzer is not prepared at {PERF_ANALYZER}",
            "`make perf-analyzer` prepares it: it needs apt-get, dpkg-deb and the registries",
        )
    return PERF_ANALYZER


@pytest.fixture(scope="module")
def server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    return serve("--workers", "2", models=["fashion_mnist", "cifar10"])


@pytest.mark.parametrize(
    ("protocol", "model", "batch"),
    [("grpc", "fashion_mnist", 1), ("http", "fashion_mnist", 1), ("http", "cifar10", 4)],
)
def test_perf_analyzer_measures_the_server(
    perf_analyzer: Path, server: ServerProcess, protocol: str, model: str, batch: int
) -> None:
    url = server.target if protocol == "grpc" else server.http_target
    # Any measurement counts as stable (-s 1000): this checks that perf_analyzer works against
    # the server, not how fast it is on a machine busy with other tests.
    done = subprocess.run(
        [
            str(perf_analyzer), "-m", model, "-i", protocol, "-u", url, "-b", str(batch),
            "--concurrency-range", "1:4:3", "--measurement-mode", "count_windows",
            "--measurement-request-count", "100", "--stability-percentage", "1000",
            "--max-trials", "10",
        ],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "compute counts must be the same" not in output
    latencies = SERVER_LATENCY.findall(output)
    assert len(latencies) == 2, output  # the server's own breakdown, per concurrency
    for _queue, compute_input, compute_infer, compute_output in latencies:
        assert int(compute_infer) > 0 and int(compute_input) > 0, output
        assert int(compute_output) > 0, output  # decode and encode are measured, not 0
    throughput = {int(c): float(t) for c, t in THROUGHPUT.findall(output)}
    assert set(throughput) == {1, 4} and all(t > 0 for t in throughput.values()), output
