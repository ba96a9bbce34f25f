"""The tuner's progress on the terminal: a bar over the budget's seconds, kept moving by a
thread while a load point runs, and a line per measurement."""

from __future__ import annotations

import sys
import threading

from benchmarks.tune.search import MEASURED, REJECTED, STOPPED, Budget, Evaluation, Trial, score


class Progress:
    """A progress bar over the budget's seconds, kept moving by a thread; a line per setting."""

    def __init__(self, budget: Budget, total_s: float) -> None:
        from tqdm import tqdm

        self._budget = budget
        self.bar = tqdm(
            total=round(total_s),
            unit="s",
            file=sys.stderr,
            bar_format="{desc} |{bar}| {n:.0f}/{total:.0f} s {postfix}",
            dynamic_ncols=True,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="tune-progress", daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            self.bar.n = min(round(self._budget.elapsed()), self.bar.total)
            self.bar.refresh()

    def doing(self, text: str) -> None:
        self.bar.set_description_str(text, refresh=False)

    def best(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=False)

    def line(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.bar.close()


def trial_line(trial: Trial, reference: Evaluation | None) -> str:
    where = f"{trial.setting.key}" + (f" (final round {trial.round})" if trial.round else "")
    if trial.status == REJECTED:
        return f"{where}: rejected: {trial.reason}"
    cells = [
        f"{label} {r.images_per_s:,.0f} img/s p99 "
        + ("-" if r.p99_ms is None else f"{r.p99_ms:.1f} ms")
        + (f" errors {r.errors}" if r.errors else "")
        for label, r in trial.points.items()
    ]
    text = f"{where}: " + ", ".join(cells)
    if trial.status == STOPPED:
        return f"{text}; stopped early: {trial.reason}"
    if reference is not None and trial.round == 0:
        mine = Evaluation(trial.setting, MEASURED, trial.points, 1)
        text += f" -> {score(mine, reference):.2f}x the start"
    return text
