"""`python -m benchmarks [options]` runs the suite; `python -m benchmarks compare ...` the
side-by-side load generator; `python -m benchmarks workers ...` the worker-count sweep with a
lean load generator."""

import sys

from benchmarks import compare, lean, suite


def main(argv: list[str]) -> int:
    if argv[:1] == ["compare"]:
        return compare.main(argv[1:])
    if argv[:1] == ["workers"]:
        return lean.main(argv[1:])
    return suite.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
