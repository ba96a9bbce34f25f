"""`python -m benchmarks [options]` runs the suite; `python -m benchmarks compare ...` the
side-by-side load generator; `python -m benchmarks precision ...` fp32 against fp16/int8."""

import sys

from benchmarks import compare, precision, suite


def main(argv: list[str]) -> int:
    if argv[:1] == ["compare"]:
        return compare.main(argv[1:])
    if argv[:1] == ["precision"]:
        return precision.main(argv[1:])
    return suite.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
