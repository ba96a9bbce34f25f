"""PNG plots of a benchmark run (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.results import SERVED, TRANSPORT, Step

PLOTS = ("throughput.png", "latency.png", "open_loop.png")


def _series(steps: Sequence[Step], server: str, images: int) -> list[Step]:
    chosen = [
        s
        for s in steps
        if s.mode == "closed" and s.server == server and s.images_per_request == images
    ]
    return sorted(chosen, key=lambda s: s.concurrency)


def write_plots(folder: Path, steps: Sequence[Step], title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    written.append(_save(figure, folder / PLOTS[0]))

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
    written.append(_save(figure, folder / PLOTS[1]))

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
    written.append(_save(figure, folder / PLOTS[2]))
    return written


def _save(figure: object, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()  # type: ignore[attr-defined]
    figure.savefig(path, dpi=100)  # type: ignore[attr-defined]
    plt.close(figure)  # type: ignore[arg-type]
    return path
