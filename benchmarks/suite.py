"""`python -m benchmarks`: the served path against its two ceilings, in one run, on one machine.

1. compute ceiling: the model's runtime alone, in this process, at batch sizes 1, 2, 4, ...
   max_batch_size (the same session settings the server uses);
2. transport ceiling: the server started with --null-compute (same wire, same batcher, no
   model: every answer is uniform probabilities);
3. served: the real server, closed loop over a concurrency sweep with 1-image and multi-image
   requests (the two servers measured side by side, step by step), then open loop at fixed
   offered rates (Poisson arrivals) for latency under a given load.

The load speaks the KServe v2 protocol (ModelInfer), so --target can point it at any v2
server (Triton, MLServer) instead of starting ours. Results: a table on the terminal,
results.json and PNG plots in --out. Headline ratios: served / transport ceiling at the same
concurrency, and served / compute ceiling at the mean batch the server formed (read from the
imgserve_batch_size histogram of its /metrics, before and after each step).

  python -m benchmarks --model-repository model_repository --model fashion_mnist
  python -m benchmarks --model-repository model_repository --model cifar10 --client-processes 2
  python -m benchmarks --target 127.0.0.1:8001 --model fashion_mnist   # any v2 server
  python -m benchmarks --short --model-repository model_repository    # a smoke check (~20 s)
  python -m benchmarks compare --help   # the side-by-side load generator for server flags
  python -m benchmarks precision --help # fp32 against its fp16/int8 exports, with accuracies
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.ceiling import CeilingPoint, best_of, measure_ceiling, server_settings
from benchmarks.clients import START_LEAD_S, ClientPool, split_load
from benchmarks.common import Config, exit_code
from benchmarks.figures import pooled
from benchmarks.measure import Timing
from benchmarks.options import (
    MAX_BATCH,
    MAX_CONCURRENCY,
    add_server_args_option,
    add_timing_options,
    bounded,
)
from benchmarks.plots import write_suite_plots
from benchmarks.results import (
    SERVED,
    TRANSPORT,
    Step,
    format_ceiling,
    format_ratios,
    format_steps,
    late_warning,
    ratios,
    save,
    step_from,
)
from benchmarks.scrape import batch_totals, mean_batch
from benchmarks.server import start_server

DEFAULT_CONCURRENCY = (1, 8, 32, 128)
SHORT_CONCURRENCY = (1, 4)
# Open loop, without --rates: these fractions of the best closed-loop 1-image rate served.
RATE_FRACTIONS = (0.25, 0.5, 0.75, 0.9)
SHORT_RATE_FRACTIONS = (0.3, 0.6)
RESULTS_FILE = "results.json"
# Slack on top of a step's own length before the parent gives up on its client processes.
COLLECT_SLACK_S = 30.0


@dataclass(frozen=True)
class Endpoint:
    """A server under load: one we started (CPU and metrics known) or an external target."""

    name: str  # SERVED | TRANSPORT
    target: str
    cpu_seconds: Callable[[], float | None]
    metrics_url: str | None


@dataclass(frozen=True)
class Plan:
    model: str
    concurrency: tuple[int, ...]
    images: tuple[int, ...]  # images per request of the closed-loop sweeps
    rates: tuple[float, ...]  # empty: rate_fractions of the best served rate
    rate_fractions: tuple[float, ...]
    timing: Timing
    ceiling_s: float  # seconds per batch size of the compute ceiling
    seed: int  # of the open loop's arrivals


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=doc.split("\n\n")[0] + "\n\n" + doc.split("\n\n")[1],
        epilog=doc.split("\n\n", 3)[3],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_argument_group("what to measure")
    where.add_argument(
        "--model-repository",
        type=Path,
        help="Start the server (and the --null-compute one) on this repository, 127.0.0.1, "
        "port 0, and measure the compute ceiling from it.",
    )
    where.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="Load an already running KServe v2 server instead of starting one (no transport "
        "ceiling; server CPU n/a; compute ceiling only with --model-repository).",
    )
    where.add_argument(
        "--metrics-url",
        help="With --target: its Prometheus /metrics URL, for the mean formed batch size.",
    )
    where.add_argument("--model", default="fashion_mnist", help="Model (default: %(default)s).")
    add_server_args_option(where, "both started servers")
    load = parser.add_argument_group("load")
    load.add_argument(
        "--concurrency",
        type=bounded(int, 1, MAX_CONCURRENCY),
        nargs="+",
        help="Closed-loop concurrency sweep (default: 1 8 32 128; --short: 1 4).",
    )
    load.add_argument(
        "--batch-images",
        type=bounded(int, 1, MAX_BATCH),
        default=8,
        help="Images per request of the multi-image sweep; 1 skips it (default: %(default)s).",
    )
    load.add_argument(
        "--rates",
        type=bounded(float, 1, 1e6),
        nargs="*",
        help="Open-loop offered rates in requests/s (1 image each); default: 25/50/75/90%% "
        "of the best closed-loop rate served; none given: skip the open loop.",
    )
    load.add_argument(
        "--client-processes",
        type=bounded(int, 1, 64),
        default=1,
        help="Client processes sharing each load, results merged; a closed-loop step uses at "
        "most one per request in flight (default: %(default)s).",
    )
    load.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of the open loop's Poisson arrivals; each client process draws its own "
        "from it (default: %(default)s).",
    )
    add_timing_options(
        load,
        (None, "Seconds measured per step (default: 5; --short: 0.5)."),
        (None, "Seconds of load before each step is measured (default: 1; --short: 0.2)."),
    )
    parser.add_argument(
        "--short",
        action="store_true",
        help="A smoke check: fewer, shorter steps (tests use it; figures are rough).",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmark-results"),
        help=f"Folder for {RESULTS_FILE} and the PNG plots (default: %(default)s).",
    )
    return parser


def _plan(args: argparse.Namespace) -> Plan:
    images = (1,) if args.batch_images == 1 else (1, args.batch_images)
    return Plan(
        model=args.model,
        concurrency=tuple(
            args.concurrency or (SHORT_CONCURRENCY if args.short else DEFAULT_CONCURRENCY)
        ),
        images=images,
        rates=tuple(args.rates or ()),
        rate_fractions=(
            () if args.rates == [] else SHORT_RATE_FRACTIONS if args.short else RATE_FRACTIONS
        ),
        timing=Timing(
            warmup_s=args.warmup if args.warmup is not None else (0.2 if args.short else 1.0),
            duration_s=args.duration or (0.5 if args.short else 5.0),
            timeout_s=args.timeout,
        ),
        ceiling_s=0.2 if args.short else 2.0,
        seed=args.seed,
    )


class Progress:
    """One line per step on stderr, with the time since the run began."""

    def __init__(self) -> None:
        self._began = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self._began:6.1f}s] {message}", file=sys.stderr, flush=True)


def _sleep_until(wall_time: float) -> None:
    time.sleep(max(wall_time - time.time(), 0.0))


def measure_step(
    pool: ClientPool,
    endpoint: Endpoint,
    plan: Plan,
    concurrency: int,
    images: int,
    rate: float | None = None,
) -> Step:
    """One measurement, its load shared by the pool; server CPU and batches read meanwhile,
    over the window the clients measure (they start it together once all are ready)."""
    config = Config(
        label=endpoint.name, api="kserve", model=plan.model, concurrency=concurrency, batch=images
    )
    timing = plan.timing
    jobs = split_load(endpoint.target, config, timing, pool.size, rate, plan.seed)
    start_at = pool.start(jobs)
    _sleep_until(start_at + timing.warmup_s)
    cpu, totals = endpoint.cpu_seconds(), batch_totals(endpoint.metrics_url, plan.model)
    _sleep_until(start_at + timing.warmup_s + timing.duration_s)
    cpu_after, totals_after = endpoint.cpu_seconds(), batch_totals(endpoint.metrics_url, plan.model)
    samples = pool.collect(START_LEAD_S + timing.bound_s + COLLECT_SLACK_S)
    used = None if cpu is None or cpu_after is None else cpu_after - cpu
    sample = pooled(samples, used, at_once=True)
    return step_from(endpoint.name, jobs, images, sample, mean_batch(totals, totals_after))


def _describe(step: Step) -> str:
    lat = step.latency_ms
    p = f"p50 {lat['p50']:.2f} p99 {lat['p99']:.2f} ms" if lat else "no answers"
    errors = f", errors {step.errors}" if step.errors else ""
    late = f", client(s) {step.late_clients} began late" if step.late_clients else ""
    return f"  -> {step.images_per_s:,.0f} images/s, {p}{errors}{late}"


def run_sweeps(
    pool: ClientPool, endpoints: Sequence[Endpoint], plan: Plan, progress: Progress
) -> list[Step]:
    """Closed loop: the endpoints side by side at each step; then the open loop (served)."""
    steps: list[Step] = []
    for images in plan.images:
        for concurrency in plan.concurrency:
            for endpoint in endpoints:
                progress(
                    f"{endpoint.name}: closed loop, concurrency {concurrency}, {images} "
                    f"img/request, {plan.timing.duration_s:g} s "
                    f"(+{plan.timing.warmup_s:g} s warm-up)"
                )
                steps.append(measure_step(pool, endpoint, plan, concurrency, images))
                progress(_describe(steps[-1]))
    served = next(e for e in endpoints if e.name == SERVED)
    rates = plan.rates
    if not rates:
        single = [s for s in steps if s.server == SERVED and s.images_per_request == 1]
        best = max((s.requests_per_s for s in single), default=0.0)
        rates = tuple(round(best * f, 1) for f in plan.rate_fractions) if best > 0 else ()
    for rate in rates:
        progress(f"{served.name}: open loop, {rate:g} requests/s offered, 1 img/request")
        steps.append(measure_step(pool, served, plan, 1, 1, rate))
        progress(_describe(steps[-1]))
    return steps


def run(args: argparse.Namespace) -> int:
    plan = _plan(args)
    progress = Progress()
    server_args = shlex.split(args.server_args)
    ceiling: list[CeilingPoint] = []
    if args.model_repository is not None:
        settings = server_settings(args.model_repository, server_args)
        progress(f"compute ceiling: {plan.model} in-process, {plan.ceiling_s:g} s per batch size")
        ceiling = measure_ceiling(
            args.model_repository, plan.model, settings, plan.ceiling_s, progress
        )
    with contextlib.ExitStack() as stack:
        progress(f"starting {args.client_processes} client process(es)")
        pool = stack.enter_context(ClientPool(args.client_processes))
        endpoints: list[Endpoint] = []
        if args.target is None:
            only = ["--models", plan.model, *server_args]
            progress("starting the server and its --null-compute twin")
            for name, extra in ((TRANSPORT, ["--null-compute"]), (SERVED, [])):
                process = stack.enter_context(start_server(args.model_repository, only + extra))
                endpoints.append(
                    Endpoint(name, process.target, process.cpu_seconds, process.metrics_url)
                )
        else:
            endpoints.append(Endpoint(SERVED, args.target, lambda: None, args.metrics_url))
        steps = run_sweeps(pool, endpoints, plan, progress)
    if args.model_repository is not None:
        # Again after the sweeps, keeping the better figure of each size: a busy machine only
        # ever slows a measurement down, and the ratios should not credit the served path
        # with a ceiling that happened to be measured during someone else's burst.
        progress("compute ceiling again, after the sweeps")
        again = measure_ceiling(
            args.model_repository, plan.model, settings, plan.ceiling_s, progress
        )
        ceiling = best_of(ceiling, again)
    found = ratios(steps, ceiling)
    settings_used = {
        "model": plan.model,
        "target": args.target or f"started servers on {args.model_repository}",
        "server_args": server_args,
        "client_processes": args.client_processes,
        "seed": plan.seed,
        "duration_s": plan.timing.duration_s,
        "warmup_s": plan.timing.warmup_s,
        "short": args.short,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save(args.out / RESULTS_FILE, settings_used, ceiling, steps, found)
    plots = write_suite_plots(args.out, steps, plan.model)
    if ceiling:
        alone = f"runtime alone, {ceiling[0].instances} instance(s) at once"
        print(f"Compute ceiling ({plan.model}, {alone}):\n{format_ceiling(ceiling)}\n")
    print(format_steps(steps))
    print("\n" + format_ratios(found))
    if (warning := late_warning(steps)) is not None:
        print("\n" + warning)
    progress(f"wrote {args.out / RESULTS_FILE} and {', '.join(p.name for p in plots)}")
    return 0 if all(s.requests for s in steps) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model_repository is None and args.target is None:
        parser.error("give --model-repository (start the servers) or --target HOST:PORT")
    if args.model_repository is not None and not args.model_repository.is_dir():
        parser.error(f"--model-repository {args.model_repository}: no such directory")
    if args.metrics_url and args.target is None:
        parser.error("--metrics-url is for --target; started servers are scraped directly")
    return exit_code(run, args)
