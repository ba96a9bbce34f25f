"""One step of the GPU check, in a process of its own: `python -m benchmarks.gpu.child STEP
CONTEXT.json` runs benchmarks.gpu.STEP's run(context, record). The last line of a step that
fails says why."""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from benchmarks.gpu.context import FAILED, OK, Context, Recorder, StepError


def main(argv: Sequence[str]) -> int:
    step, context_path = argv
    context = Context.load(Path(context_path))
    record = Recorder(context, step)
    record.update()
    try:
        run = importlib.import_module(f"benchmarks.gpu.{step}").run
        note = run(context, record)
    except StepError as error:
        record.finish(FAILED, error=str(error))
        print(f"error: {error}", flush=True)
        return 1
    except Exception as error:
        lines = traceback.format_exception(error)
        record.finish(FAILED, error=f"{type(error).__name__}: {error}", traceback=lines[-6:])
        print("".join(lines), flush=True)
        return 1
    record.finish(OK, note=note)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
