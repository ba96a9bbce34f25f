"""Does the device compute what the CPU computes? Two checks on every exported version:

- parity: the model file run on the device and on the CPU (torch or onnxruntime directly, the
  server's runtimes aside) on the reference images export recorded: largest difference of the
  probabilities, agreement of the top-1 class, and the difference from the recorded outputs
  beside the tolerance the server's load-time check allows;
- the load-time reference check itself, in a server started on the device: every version
  must turn READY; the reason of one that does not is recorded.

The export and its tolerances were set on a CPU (fp32: 1e-4). Where the device's fp32 outputs
miss that but stay within fp16's 1e-2 (TF32 convolutions on an Ampere-or-later GPU would), the
result suggests a tolerance that the later steps' servers take, so the rest of the run still
measures; the finding itself stays in the results.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.gpu.compute import load_runner, model_file
from benchmarks.gpu.context import Context, Recorder, StepError
from benchmarks.gpu.repository import models_on_device

DEFAULT_TOLERANCE = 1e-4  # the server's --reference-tolerance, what fp32 versions get
# Largest suggested tolerance: beyond fp16's own, a difference is a fault, not rounding.
MAX_SUGGESTED = 1e-2


def parity(repository: Path, name: str, model: dict[str, str], device: str) -> dict[str, Any]:
    """One version's figures: device against CPU and against the recorded outputs."""
    from modelrepo import layout

    path = model_file(repository, name, model["runtime"])
    with np.load(path.parent / layout.REFERENCE_FILE) as reference:
        inputs = np.ascontiguousarray(reference["inputs"], dtype=np.float32)
        recorded = np.asarray(reference["outputs"], dtype=np.float32)
        own = float(reference["tolerance"]) if "tolerance" in reference.files else 0.0
    on_cpu = load_runner(path, model["runtime"], "cpu")(inputs)
    on_device = on_cpu if device == "cpu" else load_runner(path, model["runtime"], device)(inputs)
    tolerance = max(own, DEFAULT_TOLERANCE)
    versus_reference = float(np.max(np.abs(on_device - recorded)))
    return {
        **model,
        "images": len(inputs),
        "device_vs_cpu": float(np.max(np.abs(on_device - on_cpu))),
        "device_vs_reference": versus_reference,
        "top1_agreement": float(np.mean(on_device.argmax(1) == on_cpu.argmax(1))),
        "tolerance": tolerance,
        "within_tolerance": versus_reference <= tolerance,
    }


def suggested_tolerance(rows: dict[str, dict[str, Any]]) -> float | None:
    """A --reference-tolerance that lets the versions that missed theirs load, when every
    miss is rounding (within MAX_SUGGESTED); None when nothing missed or a miss is a fault."""
    missed = [r["device_vs_reference"] for r in rows.values() if not r.get("within_tolerance", 1)]
    if not missed or max(missed) > MAX_SUGGESTED:
        return None
    worst = 2 * max(missed)
    digits = 10 ** math.floor(math.log10(worst))
    return min(math.ceil(worst / digits) * digits, MAX_SUGGESTED)


def load_time_check(context: Context, names: list[str], record: Recorder) -> dict[str, Any]:
    """Every version's state in a server started on the device (its load-time checks ran)."""
    from benchmarks.gpu.served import start_on_device
    from client.api import ClassifierClient

    with (
        start_on_device(context, names, record, relaxed=False) as server,
        ClassifierClient(server.target, timeout=30.0) as client,
    ):
        listed = {m.name: m for m in client.list_models()}
    return {
        name: {
            "state": listed[name].state if name in listed else "MISSING",
            "reason": listed[name].reason if name in listed else "not listed by the server",
            "version": listed[name].version if name in listed else "",
        }
        for name in names
    }


def run(context: Context, record: Recorder) -> str:
    models = context.result_of("repository").get("models", {})
    on_device = models_on_device(context)
    rows: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        if name not in on_device:
            rows[name] = {**model, "skipped": context.result_of("device").get("onnx_not_measured")}
            continue
        rows[name] = parity(context.repository, name, model, context.device)
        row = rows[name]
        record.progress(
            f"{name}: device vs CPU {row['device_vs_cpu']:.3g}, vs reference "
            f"{row['device_vs_reference']:.3g} (tolerance {row['tolerance']:g}), top-1 agreement "
            f"{row['top1_agreement']:.0%}"
        )
        record.update(parity=rows)
    suggestion = suggested_tolerance(rows)
    record.update(parity=rows, suggested_tolerance=suggestion)
    record.progress(
        f"load-time reference check: a server on {context.device} with {len(on_device)} models"
    )
    states = load_time_check(context, list(on_device), record)
    record.update(load_time=states)
    ready = [name for name, state in states.items() if state["state"] == "READY"]
    missed = [name for name, row in rows.items() if not row.get("within_tolerance", True)]
    note = (
        f"{len(ready)}/{len(states)} versions READY on {context.device} after the load-time check"
    )
    if missed:
        note += f"; outside the recorded tolerance on the device: {', '.join(missed)}"
    if suggestion:
        note += f" (later servers take --reference-tolerance {suggestion:g})"
    failed = {name: s for name, s in states.items() if s["state"] != "READY"}
    if failed:
        reasons = "; ".join(f"{name}: {s['state']} {s['reason']}" for name, s in failed.items())
        raise StepError(f"{note}; {reasons}")
    return note
