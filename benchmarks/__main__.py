"""`python -m benchmarks [options]` runs the suite; `python -m benchmarks compare ...` the
side-by-side load generator; `python -m benchmarks workers ...` the worker-count sweep with a
lean load generator; `python -m benchmarks precision ...` fp32 against fp16/int8;
`python -m benchmarks tracing ...` tracing off against sampled at 1% and 100%; `python -m
benchmarks tune ...` the serving settings that suit this machine; `python -m benchmarks gpu ...`
the GPU path in one bounded run (benchmarks.gpu); `python -m benchmarks models ...` any models
of a repository side by side, and beside another checkout's server.

A subcommand's module is imported only when it runs: `gpu` must start on a bare Python that
lacks what the others import (tritonclient, opentelemetry)."""

import importlib
import sys

SUBCOMMANDS = {
    "compare": "benchmarks.compare",
    "workers": "benchmarks.workers",
    "precision": "benchmarks.precision",
    "tracing": "benchmarks.tracing",
    "tune": "benchmarks.tune.cli",
    "gpu": "benchmarks.gpu.cli",
    "models": "benchmarks.models",
}


def main(argv: list[str]) -> int:
    module = SUBCOMMANDS.get(argv[0]) if argv else None
    if module is not None:
        return importlib.import_module(module).main(argv[1:])
    return importlib.import_module("benchmarks.suite").main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
