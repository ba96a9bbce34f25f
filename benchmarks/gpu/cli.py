"""`python -m benchmarks gpu --out DIR`: the GPU path measured in one run of at most 8 minutes.

  python3 -m benchmarks gpu --out gpu-results            # on the GPU machine
  python -m benchmarks gpu --out /tmp/gpu --device cpu --quick   # the rehearsal (about 1 min)

Steps (benchmarks.gpu.steps): wheels, device, repository, checks, compute, served, workers;
each in a process of its own under a time box, all within --budget-s. DIR receives
results.json, summary.md and run.log, rewritten after every step. This module imports only
the standard library: the carried wheels are not unpacked yet when it starts.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.gpu import report
from benchmarks.gpu.context import FAILED, OK, Context
from benchmarks.gpu.steps import STEPS, StepSpec, run_boxed

ROOT = Path(__file__).resolve().parents[2]
BUDGET_S = 480.0
# Left at the end: a stopped step's grace and its output's last lines, and the last report.
# A step is not started with less than MIN_STEP_S.
REPORT_RESERVE_S = 10.0
MIN_STEP_S = 5.0
TIMED_OUT, SKIPPED = "timed out", "skipped"
WIRE_MODULE = ROOT / "wire" / "grpc_service_pb2.py"

Command = Callable[[StepSpec, Path], list[str]]


def step_command(step: StepSpec, context: Path) -> list[str]:
    return [sys.executable, "-m", "benchmarks.gpu.child", step.name, str(context)]


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 10 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be between 10 and 3600 seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks gpu",
        description="The GPU path in one bounded, offline run: device facts, a repository "
        "trained and exported on the device (fp32, fp16), parity and load-time checks, compute "
        "alone, served figures, and --workers on one GPU. Writes results.json, summary.md and "
        "run.log to --out.",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="cuda fails the run without a GPU; cpu rehearses every step on the CPU "
        "(default: %(default)s: cuda when torch sees one)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a rehearsal: small data, one concurrency, short measurements and time boxes",
    )
    parser.add_argument(
        "--budget-s",
        type=_positive_seconds,
        default=BUDGET_S,
        help="wall time of the whole run; each step's box is cut to what is left "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--wheels",
        type=Path,
        default=ROOT / "gpu-wheels",
        help="the carried wheels (`make gpu-wheels`); absent: this Python's packages as they "
        "are (default: gpu-wheels/)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="scratch folder (repository, checkpoints, unpacked wheels), kept after the run "
        "(default: a temporary folder, removed)",
    )
    return parser


class Log:
    """Progress on stderr and in run.log, each line stamped with the run's elapsed time."""

    def __init__(self, path: Path) -> None:
        self._began = time.monotonic()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w", encoding="utf-8")

    def __call__(self, source: str, line: str) -> None:
        text = f"[{time.monotonic() - self._began:6.1f}s] {source}: {line}"
        print(text, file=sys.stderr, flush=True)
        self._file.write(text + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _device_after(requested: str, device_result: dict[str, Any]) -> tuple[str | None, str]:
    """The device the later steps use, and a note when the device step could not say."""
    if device_result.get("device"):
        return device_result["device"], ""
    if requested == "cuda":
        return None, "no usable CUDA device: the steps that need one are skipped"
    if requested == "auto":
        return "cpu", "the device step did not finish: the later steps run on the CPU"
    return requested, ""


def run_check(
    out: Path,
    *,
    device: str = "auto",
    quick: bool = False,
    budget_s: float = BUDGET_S,
    wheels: Path = ROOT / "gpu-wheels",
    work: Path,
    steps: Sequence[StepSpec] = STEPS,
    command: Command = step_command,
    argv: Sequence[str] = (),
) -> dict[str, Any]:
    """Every step in turn within the budget; results.json and summary.md after each."""
    began = time.monotonic()
    deadline = began + budget_s
    log = Log(out / report.LOG_FILE)
    context = Context(str(work), device, quick, 0.0, str(wheels), str(work / "site"))
    context.results.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (context.site, str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    run: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "benchmarks", "gpu", *argv]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "budget_s": budget_s,
        "wall_s": 0.0,
        "quick": quick,
        "device_requested": device,
        "device": None,
        "problems": [] if WIRE_MODULE.is_file() else [
            f"{WIRE_MODULE.relative_to(ROOT)} is missing: run `make proto` where grpcio-tools "
            "is installed and copy wire/ along"
        ],
        "steps": [],
    }  # fmt: skip
    try:
        for step in steps:
            record = _one_step(step, context, deadline, env, log, command)
            run["steps"].append(record)
            if step.name == "device":
                resolved, note = _device_after(device, record.get("result") or {})
                run["device"] = resolved
                if note:
                    run["problems"].append(note)
                context = Context(**{**vars(context), "device": resolved or "none"})
            run["wall_s"] = round(time.monotonic() - began, 1)
            report.write(out, run)
    finally:
        log.close()
    return run


def _one_step(
    step: StepSpec,
    context: Context,
    deadline: float,
    env: dict[str, str],
    log: Log,
    command: Command,
) -> dict[str, Any]:
    left = deadline - time.monotonic() - REPORT_RESERVE_S
    box = min(step.box(context.quick), left)
    record: dict[str, Any] = {
        "name": step.name,
        "measures": step.measures,
        "box_s": round(max(box, 0.0), 1),
        "seconds": 0.0,
    }
    why_not = None
    if context.device == "none" and step.name != "wheels":
        why_not = "no usable CUDA device"
    elif step.needs_models and not context.result_of("repository").get("models"):
        why_not = "the repository step built no model"
    elif left < MIN_STEP_S:
        why_not = f"the run's {max(left, 0):.0f} s left are too few"
    if why_not:
        log(step.name, f"skipped: {why_not}")
        return record | {"status": SKIPPED, "note": why_not}
    log(step.name, f"{step.measures} (box {box:.0f} s)")
    path = context.results / f"{step.name}.context.json"
    Context(**{**vars(context), "box_s": box}).save(path)
    finished = run_boxed(
        command(step, path), box, cwd=str(ROOT), env=env, on_line=lambda line: log(step.name, line)
    )
    result = context.result_of(step.name)
    record |= {"seconds": finished.seconds, "result": result}
    if finished.timed_out:
        status = TIMED_OUT
        note = f"stopped by its {box:.0f} s time box; what it measured before is kept"
    elif finished.returncode == 0 and result.get("status") == OK:
        status, note = OK, result.get("note") or ""
    else:
        status = FAILED
        note = result.get("error") or next(
            (line for line in reversed(finished.tail) if line.strip()),
            f"exited with status {finished.returncode}",
        )
    log(step.name, f"{status} in {finished.seconds:.1f} s: {note}")
    return record | {"status": status, "note": note}


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="imgserve-gpu-"))
    try:
        found = run_check(
            args.out,
            device=args.device,
            quick=args.quick,
            budget_s=args.budget_s,
            wheels=args.wheels,
            work=work,
            argv=argv,
        )
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    statuses = [f"{s['name']} {s['status']}" for s in found["steps"]]
    print(
        f"{', '.join(statuses)}; {found['wall_s']:.0f} s. Read {args.out / report.SUMMARY_FILE}",
        file=sys.stderr,
    )
    return 0 if all(s["status"] == OK for s in found["steps"]) else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return run(args, argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
