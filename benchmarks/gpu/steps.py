"""The steps of the GPU check and the time box each runs in.

Every step runs as a process of its own (benchmarks.gpu.child) in a session of its own, so
that a step that hangs (a CUDA call that never returns, a server that never answers) can be
stopped from outside with everything it started: at the end of its box its whole process group
gets SIGTERM, then SIGKILL. What the step recorded before then (each step rewrites its result
file as it goes) is kept and reported; the run goes on to the next step.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

# Seconds a stopped step's processes get between SIGTERM and SIGKILL.
STOP_GRACE_S = 3.0
TAIL_LINES = 30


@dataclass(frozen=True)
class StepSpec:
    name: str
    measures: str  # one line for the summary and the docs
    box_s: float  # the time box of a full run
    quick_box_s: float  # ... and of a --quick rehearsal
    # Reads the repository step's models: skipped when that step built none.
    needs_models: bool = False

    def box(self, quick: bool) -> float:
        return self.quick_box_s if quick else self.box_s


# In running order. The full boxes add up to more than the run's budget on purpose: a step
# rarely needs its whole box, and the budget caps whatever a step is left with.
STEPS = (
    StepSpec(
        "wheels", "the carried wheels this Python lacks, unpacked into a private folder", 60, 30
    ),
    StepSpec(
        "device",
        "GPU name, memory, driver and CUDA; torch, onnxruntime and their providers",
        60,
        30,
    ),
    StepSpec(
        "repository",
        "both seed models trained briefly on the device (a training step timed), exported as "
        "ONNX and TorchScript, fp32 and fp16",
        150,
        75,
    ),
    StepSpec(
        "checks",
        "parity device vs CPU on the reference images; every version's load-time reference "
        "check in a server on the device",
        90,
        45,
        True,
    ),
    StepSpec(
        "compute",
        "each runtime alone on the device: images/s, p50 and p99 per batch of 1, 8 and 64",
        60,
        30,
        True,
    ),
    StepSpec(
        "served",
        "one server process under load: images/s, p50, p99 and the mean formed batch at 1, 8 "
        "and 64 images per request and several concurrencies, fp32 and fp16",
        150,
        60,
        True,
    ),
    StepSpec(
        "workers",
        "--workers 1, 2, 4 on the one device: images/s, p99, GPU memory per worker and GPU "
        "utilisation; the default for --workers auto on CUDA decided from them",
        120,
        50,
        True,
    ),
)


@dataclass
class Finished:
    """How a step's process ended."""

    returncode: int | None  # None: stopped by its time box
    seconds: float
    tail: list[str] = field(default_factory=list)  # its last lines of output

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def _stop_group(process: subprocess.Popen[str]) -> None:
    """SIGTERM to the step's whole process group, SIGKILL to what is left after the grace."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(STOP_GRACE_S)
    _kill_group(process)


def _kill_group(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_boxed(
    command: Sequence[str],
    box_s: float,
    *,
    cwd: str,
    env: Mapping[str, str],
    on_line: Callable[[str], None] = lambda _line: None,
) -> Finished:
    """Run `command` for at most `box_s` seconds; its output goes to `on_line` line by line.

    Whatever the step leaves running when it ends (a server it failed to stop) is killed too:
    nothing of one step outlives it into the next step's measurements.
    """
    began = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    process = subprocess.Popen(
        list(command),
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip())
            on_line(line.rstrip())

    reader = threading.Thread(target=read, name="step-output", daemon=True)
    reader.start()
    code: int | None
    try:
        code = process.wait(box_s)
    except subprocess.TimeoutExpired:
        code = None
        _stop_group(process)
    else:
        _kill_group(process)
    finally:
        if process.poll() is None:  # interrupted: leave nothing behind
            _kill_group(process)
    reader.join(5.0)
    return Finished(code, round(time.monotonic() - began, 2), list(tail))
