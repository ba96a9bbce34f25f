"""`python -m benchmarks [options]` runs the suite; `python -m benchmarks compare ...` the
side-by-side load generator; `python -m benchmarks workers ...` the worker-count sweep with a
lean load generator; `python -m benchmarks precision ...` fp32 against fp16/int8;
`python -m benchmarks tracing ...` tracing off against sampled at 1% and 100%; `python -m
benchmarks tune ...` the serving settings that suit this machine."""

import sys

from benchmarks import compare, precision, suite, tracing, workers
from benchmarks.tune import cli as tune

SUBCOMMANDS = {
    "compare": compare.main,
    "workers": workers.main,
    "precision": precision.main,
    "tracing": tracing.main,
    "tune": tune.main,
}


def main(argv: list[str]) -> int:
    command = SUBCOMMANDS.get(argv[0]) if argv else None
    if command is not None:
        return command(argv[1:])
    return suite.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
