"""Every PNG the benchmarks write (matplotlib, Agg: no display needed): the suite's three, the
workers sweep's and the tuner's. matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks import h2load
from benchmarks.results import SERVED, TRANSPORT, Step

if TYPE_CHECKING:
    from benchmarks.tune.load import LoadPoint
    from benchmarks.tune.search import Outcome

SUITE_PLOTS = ("throughput.png", "latency.png", "open_loop.png")
WORKERS_PLOT = "workers.png"
TUNE_PLOT = "tune.png"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path, dpi: int = 100) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    _pyplot().close(figure)
    return path


def _series(steps: Sequence[Step], server: str, images: int) -> list[Step]:
    chosen = [
        s
        for s in steps
        if s.mode == "closed" and s.server == server and s.images_per_request == images
    ]
    return sorted(chosen, key=lambda s: s.concurrency)


def write_suite_plots(folder: Path, steps: Sequence[Step], title: str) -> list[Path]:
    """Throughput and latency against concurrency (served beside transport), and latency
    against the offered rate of the open loop."""
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    sizes = sorted({s.images_per_request for s in steps if s.mode == "closed"})
    written = []

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for server, style in ((SERVED, "-o"), (TRANSPORT, "--s")):
        for images in sizes:
            series = _series(steps, server, images)
            if series:
                axes.plot(
                    [s.concurrency for s in series],
                    [s.images_per_s for s in series],
                    style,
                    label=f"{server}, {images} img/request",
                )
    axes.set(xscale="log", xlabel="concurrency (requests in flight)", ylabel="images/s")
    axes.set_title(f"Throughput vs concurrency: {title}")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    written.append(_save(figure, folder / SUITE_PLOTS[0]))

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for server, style in ((SERVED, "-o"), (TRANSPORT, "--s")):
        series = _series(steps, server, sizes[0]) if sizes else []
        for p in ("p50", "p90", "p99"):
            points = [s for s in series if p in s.latency_ms]
            if points:
                axes.plot(
                    [s.concurrency for s in points],
                    [s.latency_ms[p] for s in points],
                    style,
                    label=f"{server} {p}",
                )
    axes.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="latency (ms)")
    axes.set_title(f"Latency vs concurrency, {sizes[0] if sizes else 1} img/request: {title}")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small", ncol=2)
    written.append(_save(figure, folder / SUITE_PLOTS[1]))

    figure, axes = plt.subplots(figsize=(7, 4.5))
    open_steps = sorted(
        (s for s in steps if s.mode == "open" and s.offered_rate), key=lambda s: s.offered_rate or 0
    )
    for p in ("p50", "p90", "p99"):
        points = [s for s in open_steps if p in s.latency_ms]
        if points:
            axes.plot([s.offered_rate for s in points], [s.latency_ms[p] for s in points], "-o")
            axes.lines[-1].set_label(p)
    axes.set(yscale="log", xlabel="offered rate (requests/s, Poisson)", ylabel="latency (ms)")
    axes.set_title(f"Open loop: latency vs offered rate: {title}")
    axes.grid(True, alpha=0.3)
    if open_steps:
        axes.legend(fontsize="small")
    written.append(_save(figure, folder / SUITE_PLOTS[2]))
    return written


def write_workers_plot(
    folder: Path, medians: dict[tuple[str, int], dict[str, float]], title: str
) -> Path:
    """Requests/s against worker processes, per server (median of rounds); a server named
    "TRANSPORT: kind" (several transports measured) is drawn in its kind's style."""
    figure, axes = _pyplot().subplots(figsize=(6.5, 4.2))
    styles = {h2load.SERVED: "-o", h2load.ONE_CONNECTION: ":^", h2load.BARE: "--s"}
    for name in dict.fromkeys(k for k, _ in medians):  # each server, in the table's order
        points = sorted((w, m["requests_per_s"]) for (k, w), m in medians.items() if k == name)
        style = styles.get(name.rpartition(": ")[2], "-o")
        axes.plot(*zip(*points, strict=True), style, label=name)
    axes.set_xlabel("worker processes")
    axes.set_ylabel("requests/s (median of rounds)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, folder / WORKERS_PLOT, dpi=110)


def write_tune_plot(
    folder: Path,
    outcome: Outcome,
    points: Sequence[LoadPoint],
    p99_budget_ms: float,
    title: str,
) -> Path:
    """Per load point, images/s against p99 for every setting tried, the start and the chosen
    one marked, and the p99 budget."""
    columns = min(len(points), 2)
    rows = -(-len(points) // columns)
    figure, grid = _pyplot().subplots(
        rows, columns, figsize=(5.2 * columns, 3.9 * rows), squeeze=False
    )
    for axes in grid.flat[len(points) :]:
        axes.set_visible(False)
    for axes, point in zip(grid.flat, points, strict=False):
        others = [
            e.points[point.label]
            for e in outcome.evaluations.values()
            if point.label in e.points and e.points[point.label].p99_ms is not None
        ]
        axes.scatter(
            [r.p99_ms for r in others],
            [r.images_per_s for r in others],
            s=22,
            color="tab:blue",
            alpha=0.6,
            label="settings tried",
        )
        for setting, marker, color, label in (
            (outcome.start, "s", "black", f"start {outcome.start.key}"),
            (outcome.chosen, "*", "tab:red", f"chosen {outcome.chosen.key}"),
        ):
            result = outcome.evaluations[setting].points.get(point.label)
            if result is not None and result.p99_ms is not None:
                axes.scatter(
                    [result.p99_ms],
                    [result.images_per_s],
                    s=160 if marker == "*" else 60,
                    marker=marker,
                    facecolors="none" if marker == "s" else color,
                    edgecolors=color,
                    label=label,
                    zorder=3,
                )
        axes.axvline(p99_budget_ms, color="gray", linestyle="--", label="p99 budget")
        axes.set_xscale("log")
        _plain_ticks(axes)
        axes.set_xlabel("p99 latency (ms)")
        axes.set_ylabel("images/s")
        axes.set_title(f"{point.concurrency} in flight x {point.images} image(s)", fontsize=10)
        axes.grid(alpha=0.3)
    grid[0][0].legend(fontsize="small")
    figure.suptitle(title, fontsize=10)
    return _save(figure, folder / TUNE_PLOT)


def _plain_ticks(axes: Any) -> None:
    """Log-scale ticks as plain numbers (40, not 4x10^1); the minor ones labelled only when
    the axis spans less than a decade, where there would be no label otherwise."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda value, _position: f"{value:g}")
    low, high = axes.get_xlim()
    axes.xaxis.set_major_formatter(plain)
    axes.xaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())
