"""`python -m benchmarks precision`: fp32 and reduced-precision versions of a model side by
side, with the accuracies export's gate measured next to their speeds.

For each pair (an fp32 model and its fp16/int8 export), in every round, one after the other:
the runtime alone at batch 1 and at max_batch_size (this process, the server's session
settings: benchmarks.ceiling), then served through the real server (one started server loads
every model of every pair, closed loop, the same load for both). Rounds interleave the two
models so that a shared machine's drift falls on both alike; ratios are reduced / fp32 of the
best round (runtime alone, as the suite's compute ceiling) or of the rounds pooled (served).
The accuracies are those config.pbtxt records: export's gate measured both on the test split.

  python -m benchmarks precision --model-repository model_repository   # pairs found by name
  python -m benchmarks precision --model-repository R --pair cifar10 cifar10_int8 --rounds 5
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.ceiling import measure_ceiling, server_settings
from benchmarks.common import BenchError, Config, Sample, exit_code
from benchmarks.figures import write_report
from benchmarks.measure import Timing, measure_started
from benchmarks.options import (
    MAX_BATCH,
    MAX_CONCURRENCY,
    add_server_args_option,
    add_timing_options,
    bounded,
)
from benchmarks.report import Outcome, summarize
from benchmarks.rounds import ratios_of
from benchmarks.server import start_server
from client.table import format_table
from modelrepo.precision import (
    ACCURACY_PARAMETER,
    FP32,
    FP32_ACCURACY_PARAMETER,
    PrecisionError,
    precision_of,
)
from server.config import Settings
from server.core.repository import ModelSpec, RepositoryError, model_names, read_model
from server.errors import ModelNotFoundError


@dataclass
class Measured:
    """One model of a pair: what it is and what it measured."""

    name: str
    precision: str
    accuracy: float | None  # top-1 on the test split, as export's gate measured it
    max_batch_size: int
    alone_images_per_s: dict[int, list[float]] = field(default_factory=dict)  # batch -> rounds
    served: Outcome | None = None

    def alone(self, batch: int) -> float:
        """The best round: on a shared machine other load only ever slows a round down."""
        return max(self.alone_images_per_s[batch])


@dataclass
class Pair:
    fp32: Measured
    reduced: Measured
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def ratios(self) -> dict[str, float]:
        """reduced / fp32: runtime alone at batch 1 and max_batch_size, served images/s and
        server CPU per request (below 1: cheaper), p50 and p99."""
        low, high = 1, self.fp32.max_batch_size
        found = {
            "alone_batch_1": (self.reduced.alone(low), self.fp32.alone(low)),
            f"alone_batch_{high}": (self.reduced.alone(high), self.fp32.alone(high)),
        }
        a, b = self.reduced.served, self.fp32.served
        if a is not None and b is not None:
            found["served_images_per_s"] = (a.images_per_s, b.images_per_s)
            found["server_cpu_ms_per_request"] = (
                a.server_cpu_ms_per_request,
                b.server_cpu_ms_per_request,
            )
            found["p50"] = (a.latency_ms.get("p50"), b.latency_ms.get("p50"))
            found["p99"] = (a.latency_ms.get("p99"), b.latency_ms.get("p99"))
        return ratios_of(found)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks precision",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model-repository",
        type=Path,
        required=True,
        metavar="REPO",
        help="The repository; the started server serves it on 127.0.0.1, port 0.",
    )
    parser.add_argument(
        "--pair",
        nargs=2,
        action="append",
        metavar=("FP32_MODEL", "REDUCED_MODEL"),
        help="Models to compare (repeatable). Default: every fp16/int8 model NAME_fp16 or "
        "NAME_int8 with an fp32 model NAME beside it.",
    )
    parser.add_argument(
        "--concurrency",
        type=bounded(int, 1, MAX_CONCURRENCY),
        default=8,
        help="Requests in flight when served (default: %(default)s).",
    )
    parser.add_argument(
        "--batch",
        type=bounded(int, 1, MAX_BATCH),
        default=8,
        help="Images per served request: several, so that batches form and compute shows "
        "(default: %(default)s).",
    )
    parser.add_argument(
        "--api", choices=("native", "kserve"), default="native", help="(default: %(default)s)"
    )
    add_timing_options(
        parser,
        (3.0, "Seconds each model is served and measured per round (default: %(default)s)."),
        (1.0, "Seconds of load before measuring (default: %(default)s)."),
    )
    parser.add_argument(
        "--ceiling-seconds",
        type=bounded(float, 0.01, 60.0),
        default=0.5,
        help="Seconds the runtime alone runs at each batch size per round (default: %(default)s).",
    )
    parser.add_argument(
        "--rounds",
        type=bounded(int, 1, 10),
        default=3,
        help="Rounds; each measures every model once, in turn (default: %(default)s).",
    )
    add_server_args_option(parser, "the started server (and the runtime alone)")
    parser.add_argument("--out", type=Path, help="Write the results as JSON to this file.")
    return parser


def find_pairs(repository: Path, settings: Settings, asked: list[list[str]] | None) -> list[Pair]:
    """The pairs asked for, or found by name; each model read and checked the server's way."""
    if asked is None:
        names = set(model_names(repository))
        asked = [
            [name.rsplit("_", 1)[0], name]
            for name in sorted(names)
            if name.rsplit("_", 1)[-1] in ("fp16", "int8") and name.rsplit("_", 1)[0] in names
        ]
        if not asked:
            raise BenchError(
                f"no pairs in {repository}: name them with --pair, or export NAME_int8 / "
                "NAME_fp16 beside an fp32 model NAME"
            )
    pairs = []
    known: dict[str, Measured] = {}  # a model in several pairs is measured once per round
    for base, other in asked:
        specs = [_read(repository, name, settings) for name in (base, other)]
        fp32, reduced = (known.setdefault(spec.name, _measured(spec)) for spec in specs)
        if fp32.precision != FP32 or reduced.precision == FP32:
            raise BenchError(
                f"--pair {base} {other}: expected an fp32 model and a reduced one, found "
                f"{fp32.precision} and {reduced.precision}"
            )
        if fp32.accuracy is None:
            # fp32 exports run no gate: its accuracy on the same test split is the one the
            # reduced export's gate measured (the same checkpoint when both came from one).
            fp32.accuracy = _recorded_accuracy(specs[1], FP32_ACCURACY_PARAMETER)
        pairs.append(Pair(fp32, reduced))
    return pairs


def _read(repository: Path, name: str, settings: Settings) -> ModelSpec:
    try:
        return read_model(repository, name, settings)
    except (RepositoryError, ModelNotFoundError, PrecisionError) as error:
        raise BenchError(f"cannot read model {name!r} from {repository}: {error}") from None


def _recorded_accuracy(spec: ModelSpec, key: str) -> float | None:
    parameters = spec.config.parameters
    return float(parameters[key].string_value) if key in parameters else None


def _measured(spec: ModelSpec) -> Measured:
    accuracy = _recorded_accuracy(spec, ACCURACY_PARAMETER)
    return Measured(spec.name, precision_of(spec.config), accuracy, spec.max_batch_size)


def run(args: argparse.Namespace) -> int:
    extra = tuple(shlex.split(args.server_args))
    settings = server_settings(args.model_repository, extra)
    pairs = find_pairs(args.model_repository, settings, args.pair)
    models = list({m.name: m for pair in pairs for m in (pair.fp32, pair.reduced)}.values())
    timing = Timing(args.warmup, args.duration, args.timeout)
    samples: dict[str, list[Sample]] = {m.name: [] for m in models}
    configs = {
        m.name: Config(m.name, args.api, m.name, args.concurrency, batch=args.batch) for m in models
    }
    server_args = ("--models", ",".join(m.name for m in models), *extra)
    with start_server(args.model_repository, server_args) as server:
        for round_no in range(1, args.rounds + 1):
            for model in models:
                progress(f"[round {round_no}/{args.rounds}] {model.name} ({model.precision})")
                points = measure_ceiling(
                    args.model_repository,
                    model.name,
                    settings,
                    args.ceiling_seconds,
                    sizes=(1, model.max_batch_size),
                )
                for point in points:
                    model.alone_images_per_s.setdefault(point.batch_size, []).append(
                        point.images_per_s
                    )
                sample = measure_started(server, configs[model.name], timing)
                samples[model.name].append(sample)
    for model in models:
        model.served = summarize(configs[model.name], samples[model.name])
    print(format_pairs(pairs, args.concurrency, args.batch))
    if args.out is not None:
        write_report(
            args.out,
            {
                "benchmark": "precision",
                "rounds": args.rounds,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "ceiling_seconds": args.ceiling_seconds,
                "server_args": list(extra),
                "pairs": [
                    {"fp32": asdict(p.fp32), "reduced": asdict(p.reduced), "ratios": p.ratios()}
                    for p in pairs
                ],
            },
        )
        progress(f"wrote {args.out}")
    failed = [m.name for m in models if m.served is None or not m.served.requests]
    if failed:
        print(f"error: no answers from {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def format_pairs(pairs: Sequence[Pair], concurrency: int, batch: int) -> str:
    """One table: each pair's two models, then a row of reduced / fp32 ratios."""
    high = sorted({p.fp32.max_batch_size for p in pairs})
    alone = [f"ALONE B{b}" for b in (1, *high)]
    headers = ["MODEL", "PRECISION", "TOP-1", *alone]
    headers += ["SERVED IMG/S", "P50 MS", "P99 MS", "MS/REQ"]
    rows: list[list[object]] = []
    for pair in pairs:
        for model in (pair.fp32, pair.reduced):
            served = model.served
            cells = [
                model.name,
                model.precision,
                "-" if model.accuracy is None else f"{model.accuracy:.2%}",
                *(
                    f"{model.alone(b):,.0f}" if b in model.alone_images_per_s else "-"
                    for b in (1, *high)
                ),
            ]
            if served is not None:
                lat = served.latency_ms
                cpu = served.server_cpu_ms_per_request
                cells += [
                    f"{served.images_per_s:,.0f}",
                    f"{lat['p50']:.2f}" if "p50" in lat else "-",
                    f"{lat['p99']:.2f}" if "p99" in lat else "-",
                    "n/a" if cpu is None else f"{cpu:.2f}",
                ]
            rows.append(cells)
        ratios = pair.ratios()
        drop = (
            f"{100 * (pair.reduced.accuracy - pair.fp32.accuracy):+.2f} pt"
            if pair.reduced.accuracy is not None and pair.fp32.accuracy is not None
            else "-"
        )
        keys = [f"alone_batch_{b}" for b in (1, *high)]
        keys += ["served_images_per_s", "p50", "p99", "server_cpu_ms_per_request"]
        rows.append(
            [f"  {pair.reduced.precision} / fp32", "", drop, *(_ratio(ratios.get(k)) for k in keys)]
        )
    title = (
        f"runtime alone: images/s, best of rounds; served: {batch} image(s) per request at "
        f"concurrency {concurrency}, rounds pooled"
    )
    return f"{title}\n" + format_table(headers, rows, right=range(2, len(headers)))


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model_repository.is_dir():
        parser.error(f"--model-repository {args.model_repository}: no such directory")
    return exit_code(run, args)
