"""What a step of the GPU check is given (Context) and how it reports (Recorder, StepError).

A step writes what it has measured so far to its result file after every figure (atomically:
a step stopped mid-write leaves the previous version), so a step stopped by its time box still
reports what it reached.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RUNNING, OK, FAILED = "running", "ok", "failed"


class StepError(Exception):
    """A step that cannot do its work, for a reason worth one line (no traceback)."""


@dataclass(frozen=True)
class Context:
    """What every step is told: where things are, on what device, in what time."""

    work: str  # scratch folder of the run: repository, checkpoints, results of the steps
    device: str  # "cuda" or "cpu" (after the device step; "auto" before it)
    quick: bool  # a rehearsal: smaller data, shorter measurements
    box_s: float  # this step's time box
    wheels: str  # the carried wheels' folder
    site: str  # where they are unpacked

    @property
    def repository(self) -> Path:
        return Path(self.work) / "model_repository"

    @property
    def results(self) -> Path:
        return Path(self.work) / "steps"

    def result_of(self, step: str) -> dict[str, Any]:
        """An earlier step's result ({} when it recorded none)."""
        path = self.results / f"{step}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> Context:
        return cls(**json.loads(path.read_text()))


class Recorder:
    """A step's result file, rewritten as figures come in; progress lines on stdout."""

    def __init__(self, context: Context, step: str) -> None:
        self._path = context.results / f"{step}.json"
        self._began = time.monotonic()
        # The step stops starting new measurements this long before its box ends, so it can
        # stop its servers and say what it skipped rather than be killed mid-way.
        self._deadline = self._began + context.box_s - min(10.0, context.box_s * 0.15)
        self.data: dict[str, Any] = {"status": RUNNING}

    def time_left(self) -> float:
        return self._deadline - time.monotonic()

    def update(self, **figures: Any) -> None:
        self.data.update(figures)
        self._write()

    def progress(self, message: str) -> None:
        print(f"{time.monotonic() - self._began:6.1f}s {message}", flush=True)

    def finish(self, status: str, **figures: Any) -> None:
        self.update(status=status, **figures)

    def _write(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._path.with_name(f".{self._path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(temporary, self._path)
