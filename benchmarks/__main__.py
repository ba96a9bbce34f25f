"""`python -m benchmarks [options]` runs the suite; `python -m benchmarks compare ...` the
side-by-side load generator."""

import sys

from benchmarks import compare, suite


def main(argv: list[str]) -> int:
    if argv[:1] == ["compare"]:
        return compare.main(argv[1:])
    return suite.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
