"""`python -m benchmarks tune`: measures a model against the real server on this machine over
a search of its serving settings, under a p99 latency budget, and with --apply writes the
best into its config.pbtxt.

What it searches: worker processes (a server flag), and in config.pbtxt max_batch_size,
dynamic_batching's max_queue_delay_microseconds, the instance_group count and the
intra-op threads of each onnxruntime instance (Triton's onnxruntime backend parameter
`intra_op_thread_count`, which this server honours too). Each setting is measured closed
loop at every load point (--concurrency x --images) with h2load when it is installed
(else Python client processes), against a server started on a scratch copy of the model:
one server per worker count, the model reloaded through RepositoryModelLoad for each
per-model setting.

How it searches, rather than trying every combination: from the model's current settings,
one dimension at a time, it walks up (then, if up does not help, down) while each step
improves the geometric-mean images/s by more than --min-gain, and passes again until
nothing moves; a measurement stops early once its load points so far show it cannot win.
The best few then meet the current settings again in interleaved rounds, the worse half
leaving after each (successive halving), and a challenger must still beat the current
settings by --min-gain on the medians and win most rounds side by side. Settings over the
p99 budget lose to any within it. All of it stays within --budget-s, a share of which is
kept for the finals.

Results: a table, results.json (rewritten after every measurement: Ctrl-C leaves it whole,
and --resume replays it and goes on) and tune.png (images/s against p99 for every setting
tried, per load point, the chosen one marked) in --out, and a paragraph on the choice.
--apply edits only the tuned values in config.pbtxt (comments and fields this server does
not read stay), after loading the new file the way the server does; the file is replaced
atomically, never half-written. Workers are printed as the flag to serve with.

  python -m benchmarks tune --model-repository model_repository --model fashion_mnist
  python -m benchmarks tune --model-repository model_repository --model cifar10 \\
      --concurrency 8 64 --images 1 8 --p99-ms 50 --budget-s 600 --apply
  python -m benchmarks tune --model-repository R --model M --max-batch-size 16,32,64 \\
      --workers 2 --resume
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.ceiling import server_settings
from benchmarks.common import BenchError, exit_code
from benchmarks.measure import Timing
from benchmarks.options import (
    MAX_BATCH,
    MAX_CONCURRENCY,
    add_server_args_option,
    add_timing_options,
    bounded,
)
from benchmarks.plots import write_tune_plot
from benchmarks.tune.apply import Refused, apply_config, diff
from benchmarks.tune.bench import POINT_OVERHEAD_S, Bench, generator_for
from benchmarks.tune.configs import current_setting, render
from benchmarks.tune.load import (
    H2LOAD,
    PYTHON,
    LoadPoint,
    held,
    pick_generator,
)
from benchmarks.tune.progress import Progress, trial_line
from benchmarks.tune.report import (
    RESULTS_FILE,
    explain,
    format_results,
    recorded_trials,
    save,
    workers_advice,
)
from benchmarks.tune.search import (
    MEASURED,
    Budget,
    Evaluation,
    Outcome,
    Search,
    Trial,
    finals_measurements,
    score,
)
from benchmarks.tune.servers import OWN_FLAGS, Servers
from benchmarks.tune.space import (
    DIMENSIONS,
    Setting,
    Space,
    default_space,
    overridden,
    start_workers,
)
from modelrepo.layout import CONFIG_FILE, PLATFORM_ONNX
from modelrepo.precision import PrecisionError
from server.config import Settings
from server.core.repository import ModelSpec, RepositoryError, read_model
from server.errors import ModelNotFoundError
from server.processes.cpus import usable_cpus

# Defaults: one request at a time (latency-bound) and a busy server, 1-image and 8-image
# requests; a budget the seed models can meet on 2 shared cores at that load.
DEFAULT_CONCURRENCY = (1, 16)
DEFAULT_IMAGES = (1, 8)
DEFAULT_P99_MS = 200.0
DEFAULT_BUDGET_S = 300.0
# At most this share of the budget is kept for the finals.
FINALS_SHARE = 0.4
# Flags of the dimensions: the option names and what each value may be.
_LIST_OPTIONS = {
    "workers": ("--workers", 1, "worker processes (a server flag)"),
    "instances": ("--instances", 1, "instance_group count"),
    "threads": ("--threads", 0, "intra-op threads per instance (0: onnxruntime's default)"),
    "max_batch_size": ("--max-batch-size", 1, "max_batch_size"),
    "max_queue_delay_us": ("--max-queue-delay-us", 0, "max_queue_delay_microseconds"),
}


def _values(low: int) -> Callable[[str], list[int]]:
    def parse(text: str) -> list[int]:
        try:
            values = sorted({int(part) for part in text.split(",") if part.strip()})
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers like 1,2,4, got {text!r}") from None
        if not values or values[0] < low:
            raise argparse.ArgumentTypeError(f"values must be at least {low}, got {text!r}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks tune",
        description="\n\n".join(doc.split("\n\n")[:4]),
        epilog="\n\n".join(doc.split("\n\n")[4:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_argument_group("what to tune")
    what.add_argument("--model-repository", type=Path, required=True, metavar="REPO")
    what.add_argument("--model", default="fashion_mnist", help="(default: %(default)s)")
    add_server_args_option(what, "the started servers and the --apply check (not --workers)")
    load = parser.add_argument_group("the load each setting is measured under")
    load.add_argument(
        "--concurrency",
        type=bounded(int, 1, MAX_CONCURRENCY),
        nargs="+",
        default=list(DEFAULT_CONCURRENCY),
        help="Requests in flight, closed loop (default: 1 16).",
    )
    load.add_argument(
        "--images",
        type=bounded(int, 1, MAX_BATCH),
        nargs="+",
        default=list(DEFAULT_IMAGES),
        help="Images per request; every concurrency with every size is a load point "
        "(default: 1 8).",
    )
    load.add_argument(
        "--p99-ms",
        type=bounded(float, 0.01, 1e6),
        default=DEFAULT_P99_MS,
        help="Latency budget: p99 at every load point must stay within it (default: %(default)s).",
    )
    load.add_argument(
        "--load-generator",
        choices=("auto", H2LOAD, PYTHON),
        default="auto",
        help="h2load (Debian's nghttp2-client; little CPU), Python client processes, or auto: "
        "h2load when installed (default: %(default)s).",
    )
    load.add_argument(
        "--client-processes",
        type=bounded(int, 1, 64),
        default=2,
        help="Python load generator only: processes, each one connection (default: %(default)s).",
    )
    add_timing_options(
        load,
        (2.0, "Seconds measured per load point (default: %(default)s)."),
        (1.0, "Seconds of load before each load point is measured (default: %(default)s)."),
    )
    search = parser.add_argument_group(
        "the search (comma-separated values replace a dimension's defaults; one value fixes it)"
    )
    for dimension, (flag, low, what_it_is) in _LIST_OPTIONS.items():
        search.add_argument(
            flag,
            dest=dimension,
            type=_values(low),
            metavar="N,N",
            help=f"Values of {what_it_is}." + _default_help(dimension),
        )
    search.add_argument(
        "--budget-s",
        type=bounded(float, 1, 86400),
        default=DEFAULT_BUDGET_S,
        help="Wall-clock seconds for the whole search and finals (default: %(default)s).",
    )
    search.add_argument(
        "--min-gain",
        type=bounded(float, 0, 10),
        default=0.05,
        help="Improvement a step of the search, and the final choice over the current "
        "settings, must show (default: %(default)s, i.e. 5%%).",
    )
    search.add_argument(
        "--finalists",
        type=bounded(int, 1, 8),
        default=3,
        help="Settings in the finals, the current ones included; 1 skips the finals "
        "(default: %(default)s).",
    )
    out = parser.add_argument_group("results")
    out.add_argument(
        "--out",
        type=Path,
        help="Folder for results.json and tune.png (default: benchmark-results/tune-MODEL).",
    )
    out.add_argument(
        "--resume",
        action="store_true",
        help="Replay the measurements in --out's results.json (same options) and go on.",
    )
    out.add_argument(
        "--apply",
        action="store_true",
        help="Write the chosen per-model settings into the model's config.pbtxt.",
    )
    return parser


def _default_help(dimension: str) -> str:
    return {
        "workers": " Default: 1, 2, 4, ... up to the usable CPUs. The search starts at the "
        "usable CPUs (what --workers auto starts) when listed, else at the largest.",
        "instances": " Default: 1, 2, 4, at most the CPUs (at least 2).",
        "threads": " Default: 1, 2, 4, at most the CPUs; onnxruntime models only.",
        "max_batch_size": " Default: 8,16,32,64,128.",
        "max_queue_delay_us": " Default: 0,100,500,2000.",
    }[dimension] + ("" if dimension == "workers" else " The model's current value is added.")


# --- setting up ------------------------------------------------------------------------------


def _read(repository: Path, model: str, settings: Settings) -> ModelSpec:
    try:
        return read_model(repository, model, settings)
    except (RepositoryError, ModelNotFoundError, PrecisionError) as error:
        raise BenchError(f"cannot read model {model!r} from {repository}: {error}") from None


def _space(
    args: argparse.Namespace, spec: ModelSpec, cpus: int, server_default_delay_us: int
) -> tuple[Space, Setting]:
    onnx = spec.platform == PLATFORM_ONNX
    if args.threads and not onnx:
        raise BenchError(
            f"{spec.name} is TorchScript: torch's threads belong to the process, so its "
            "intra-op threads are the server's --intra-op-threads (pass them in --server-args)"
        )
    chosen = {d: getattr(args, d) for d in DIMENSIONS}
    if len(spec.config.instance_group) > 1:
        if args.instances:
            raise BenchError(
                f"{spec.name} has {len(spec.config.instance_group)} instance groups: their "
                "counts are for their author to set (no --instances)"
            )
        chosen["instances"] = [spec.instance_count]
    space = overridden(default_space(cpus, threads_searched=onnx), chosen)
    if server_default_delay_us > 0:
        # config.pbtxt cannot say 0 then: proto3 reads 0 as "the server's default".
        delays = tuple(d for d in space.max_queue_delay_us if d > 0)
        space = dataclasses.replace(space, max_queue_delay_us=delays)
    start = current_setting(spec, start_workers(space))
    return space.with_start(start), start


def _points(args: argparse.Namespace) -> list[LoadPoint]:
    return [LoadPoint(c, i) for i in args.images for c in args.concurrency]


def _context(
    args: argparse.Namespace, original: str, space: Space, points: Sequence[LoadPoint], gen: str
) -> dict[str, object]:
    """What a resumed run must share with the recorded one for its figures to mean the same."""
    return {
        "model": args.model,
        "config_sha256": hashlib.sha256(original.encode()).hexdigest(),
        "load_points": [p.label for p in points],
        "load_generator": gen,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "p99_ms": args.p99_ms,
        "min_gain": args.min_gain,
        "finalists": args.finalists,
        "space": space.as_dict(),
        "server_args": list(args.server_args_list),
    }


# --- the run ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    cpus = usable_cpus()
    model_dir = args.model_repository / args.model
    settings = server_settings(args.model_repository, args.server_args_list)
    spec = _read(args.model_repository, args.model, settings)
    original = (model_dir / CONFIG_FILE).read_text(encoding="utf-8")
    space, start = _space(args, spec, cpus, settings.max_queue_delay_us)
    points = _points(args)
    generator_name = pick_generator(args.load_generator)
    timing = Timing(args.warmup, args.duration, args.timeout)
    out = args.out or Path("benchmark-results") / f"tune-{args.model}"
    context = _context(args, original, space, points, generator_name)
    recorded: list[Trial] = []
    if args.resume:
        try:
            recorded = recorded_trials(out / RESULTS_FILE, context)
        except ValueError as error:
            raise BenchError(str(error)) from None
    per_trial = len(points) * (timing.warmup_s + timing.duration_s + POINT_OVERHEAD_S) + 0.5
    if per_trial + 3.0 > args.budget_s and not recorded:
        raise BenchError(
            f"--budget-s {args.budget_s:g} does not fit one measurement (about {per_trial + 3:.0f}"
            f" s: {len(points)} load point(s) x {timing.warmup_s:g} s warm-up + "
            f"{timing.duration_s:g} s, and a server start)"
        )
    reserve = min(FINALS_SHARE * args.budget_s, finals_measurements(args.finalists) * per_trial)
    budget = Budget(args.budget_s, reserve)
    loads = ", ".join(f"{held(p, generator_name)} in flight x {p.images} image(s)" for p in points)
    print(
        f"tuning {args.model} ({spec.platform}) on {cpus} usable CPU(s): {len(space.searched())} "
        f"dimension(s) searched of {space.size()} settings, load {loads} ({generator_name}), "
        f"p99 budget {args.p99_ms:g} ms, {args.budget_s:g} s budget"
        + (f", {len(recorded)} recorded measurement(s) replayed" if recorded else ""),
        file=sys.stderr,
        flush=True,
    )
    progress = Progress(budget, args.budget_s)
    trials: list[Trial] = []
    try:
        with (
            Servers(model_dir, args.model, original, args.server_args_list) as servers,
            generator_for(generator_name, args.model, spec, args) as generator,
        ):
            bench = Bench(
                servers, generator, points, timing, original, start, args.p99_ms, progress
            )
            reference: list[Evaluation] = []
            best_score = [0.0]  # the search's best single round so far, for the bar

            def on_trial(trial: Trial) -> None:
                trials.append(trial)
                if trial.setting == start and trial.round == 0 and trial.status == MEASURED:
                    reference.append(Evaluation(start, MEASURED, trial.points, 1))
                progress.line(trial_line(trial, reference[0] if reference else None))
                save(out / RESULTS_FILE, context, trials)
                if reference and trial.status == MEASURED and trial.round == 0:
                    mine = score(Evaluation(trial.setting, MEASURED, trial.points, 1), reference[0])
                    if mine > best_score[0]:
                        best_score[0] = mine
                        progress.best(f"best so far: {trial.setting.key} {mine:.2f}x")

            search = Search(
                space,
                start,
                args.p99_ms,
                args.min_gain,
                args.finalists,
                bench.measure,
                bench.estimate,
                budget,
                recorded,
                on_trial,
            )
            outcome = search.run()
    except KeyboardInterrupt:
        progress.close()
        print(
            f"interrupted: {len(trials)} measurement(s) kept in {out / RESULTS_FILE} (--resume "
            f"goes on from there); {CONFIG_FILE} was not touched",
            file=sys.stderr,
        )
        return 130
    progress.close()
    return _report(args, outcome, points, original, start, context, out, budget, cpus)


def _report(
    args: argparse.Namespace,
    outcome: Outcome,
    points: Sequence[LoadPoint],
    original: str,
    start: Setting,
    context: dict[str, object],
    out: Path,
    budget: Budget,
    cpus: int,
) -> int:
    chosen = outcome.chosen
    text = render(original, start, chosen)
    paragraph = explain(
        outcome, points, args.p99_ms, args.min_gain, args.budget_s, budget.elapsed(), cpus
    )
    save(
        out / RESULTS_FILE,
        context,
        outcome.trials,
        outcome={
            "start": start.as_dict(),
            "chosen": chosen.as_dict(),
            "feasible": outcome.feasible,
            "score": round(outcome.score(chosen), 4),
            "finalists": [s.key for s in outcome.finalists],
            "final_rounds": outcome.final_rounds,
            "stopped_by_budget": outcome.stopped_by_budget,
            "moves": [
                {"dimension": m.dimension, "from": m.before.key, "to": m.after.key, "gain": m.gain}
                for m in outcome.moves
            ],
            "explanation": paragraph,
            "config_before": original,
            "config_chosen": text,
            "workers_flag": f"--workers {chosen.workers}",
        },
    )
    title = f"{args.model}: images/s against p99 of every setting tried (p99 budget dashed)"
    plot = write_tune_plot(out, outcome, points, args.p99_ms, title)
    print(format_results(outcome, points, args.p99_ms))
    print("\n" + paragraph + "\n")
    print(f"results: {out / RESULTS_FILE}, plot: {plot}")
    model_dir = args.model_repository / args.model
    change = diff(original, text, f"{args.model}/{CONFIG_FILE}")
    if not outcome.feasible:
        if args.apply:
            print(
                f"error: nothing written: no setting met --p99-ms {args.p99_ms:g}", file=sys.stderr
            )
            return 1
        return 0
    if not change:
        print(f"{CONFIG_FILE} already holds the chosen per-model settings: nothing to write.")
    elif not args.apply:
        print(f"--apply would write:\n{change}")
    else:
        try:
            apply_config(model_dir, original, text, args.server_args_list)
        except Refused as error:
            print(f"error: {CONFIG_FILE} not written: {error}", file=sys.stderr)
            return 1
        print(
            f"wrote {model_dir / CONFIG_FILE} (checked by loading it as the server does):\n{change}"
        )
    print(f"Workers: {workers_advice(chosen.workers, cpus)}.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model_repository.is_dir():
        parser.error(f"--model-repository {args.model_repository}: no such directory")
    args.server_args_list = shlex.split(args.server_args)
    own = [a for a in args.server_args_list if a.split("=")[0] in OWN_FLAGS]
    if own:
        parser.error(
            f"--server-args may not set {', '.join(own)}: the tuner sets them (workers are "
            "searched: --workers)"
        )
    return exit_code(run, args)
