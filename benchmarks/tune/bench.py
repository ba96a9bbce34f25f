"""Measuring one setting: its config.pbtxt text written and loaded by the real server, then
every load point, stopping early once the setting cannot win."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator, Sequence

from benchmarks.common import BenchError
from benchmarks.measure import Timing
from benchmarks.tune.configs import render
from benchmarks.tune.load import (
    H2LOAD,
    H2Load,
    LoadGenerator,
    LoadPoint,
    PointResult,
    PythonClients,
)
from benchmarks.tune.progress import Progress
from benchmarks.tune.search import MEASURED, REJECTED, STOPPED, Evaluation, Trial, early_stop
from benchmarks.tune.servers import Rejected, Servers
from benchmarks.tune.space import Setting
from modelrepo.config_edit import ConfigEditError
from modelrepo.layout import CONFIG_FILE
from server.core.repository import ModelSpec

# Seconds a load point costs beyond its warm-up and duration (h2load start, the CPU reads);
# replaced by what the measurements really took once there are some.
POINT_OVERHEAD_S = 0.5


class Bench:
    """Measures one setting: its config written and loaded, then every load point."""

    def __init__(
        self,
        servers: Servers,
        generator: LoadGenerator,
        points: Sequence[LoadPoint],
        timing: Timing,
        original: str,
        start: Setting,
        p99_ms: float,
        progress: Progress,
    ) -> None:
        self.servers = servers
        self.generator = generator
        self.points = list(points)
        self.timing = timing
        self.original = original
        self.start = start
        self.p99_ms = p99_ms
        self.progress = progress
        self._trial_seconds: list[float] = []

    def estimate(self, setting: Setting) -> float:
        """Seconds one measurement of `setting` will take (a server start included)."""
        if self._trial_seconds:
            seconds = sorted(self._trial_seconds)[len(self._trial_seconds) // 2]
        else:
            per_point = self.timing.warmup_s + self.timing.duration_s + POINT_OVERHEAD_S
            seconds = len(self.points) * per_point + 0.5
        if not self.servers.running(setting.workers):
            starts = self.servers.start_seconds
            seconds += max(starts) if starts else 3.0
        return seconds

    def measure(self, setting: Setting, round_: int, bar: Evaluation | None) -> Trial:
        began = time.monotonic()
        starts_before = sum(self.servers.start_seconds)
        trial = self._measure(setting, round_, bar)
        trial.seconds = time.monotonic() - began
        if trial.status == MEASURED:  # a server start is estimated apart
            self._trial_seconds.append(
                trial.seconds - (sum(self.servers.start_seconds) - starts_before)
            )
        return trial

    def _measure(self, setting: Setting, round_: int, bar: Evaluation | None) -> Trial:
        self.progress.doing(f"{setting.key}: loading")
        try:
            text = render(self.original, self.start, setting)
        except ConfigEditError as error:
            return Trial(setting, round_, REJECTED, reason=f"cannot edit {CONFIG_FILE}: {error}")
        try:
            target = self.servers.serve(setting.workers, text)
        except Rejected as error:
            return Trial(setting, round_, REJECTED, reason=str(error))
        for images in sorted({p.images for p in self.points}):
            self.generator.check(target, images)
        results: dict[str, PointResult] = {}
        for number, point in enumerate(self.points, 1):
            self.progress.doing(f"{setting.key}: {point.label} ({number}/{len(self.points)})")
            try:
                result = self.generator.run(target, point, self.timing)
            except BenchError:
                if self.servers.running(setting.workers):
                    raise
                # The server died under this setting (say, out of memory): a setting to
                # avoid, not a reason to stop tuning; the next one starts a new server.
                why = f"the server exited during {point.label}"
                return Trial(setting, round_, REJECTED, results, reason=why)
            results[point.label] = result
            why = early_stop(results, bar, self.p99_ms)
            if why is not None and number < len(self.points):
                return Trial(setting, round_, STOPPED, results, reason=why)
        return Trial(setting, round_, MEASURED, results)


@contextlib.contextmanager
def generator_for(
    name: str, model: str, spec: ModelSpec, args: argparse.Namespace
) -> Iterator[LoadGenerator]:
    generator: LoadGenerator = (
        H2Load(model, spec.image.shape if spec.image else (), args.images)
        if name == H2LOAD
        else PythonClients(model, args.client_processes)
    )
    try:
        yield generator
    finally:
        generator.close()
