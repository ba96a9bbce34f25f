"""results.json (everything each step recorded) and summary.md (the tables a person reads),
rewritten after every step so that a run cut short still leaves both."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.md"
LOG_FILE = "run.log"


def write(out: Path, run: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _replace(out / RESULTS_FILE, json.dumps(run, indent=2, default=str) + "\n")
    _replace(out / SUMMARY_FILE, summary(run))


def _replace(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    if not rows:
        return ["(nothing recorded)", ""]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join("-" if c is None else str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _num(value: float | None, digits: int = 1) -> str | None:
    return None if value is None else f"{value:,.{digits}f}"


def _sci(value: float | None) -> str | None:
    return None if value is None else f"{value:.2g}"


def _errors(errors: dict[str, int] | None) -> str:
    return ", ".join(f"{code} {n}" for code, n in sorted((errors or {}).items())) or "0"


def summary(run: dict[str, Any]) -> str:
    steps = {step["name"]: step for step in run["steps"]}
    result = {name: step.get("result") or {} for name, step in steps.items()}
    lines = [
        "# GPU check",
        "",
        f"`{run['command']}` on {run.get('device') or '?'} (asked: {run['device_requested']}), "
        f"{run['created']}: {run['wall_s']:.0f} s of a {run['budget_s']:.0f} s budget"
        + ("; a --quick rehearsal: small data, short measurements" if run["quick"] else "")
        + ".",
        "",
    ]
    lines += [f"**{problem}**" for problem in run.get("problems", [])]
    lines += _table(
        ["step", "status", "s (box)", "outcome"],
        [
            [s["name"], s["status"], f"{s['seconds']:.0f} ({s['box_s']:.0f})", s.get("note", "")]
            for s in run["steps"]
        ],
    )
    lines += _device(result.get("device", {}), result.get("wheels", {}))
    lines += _repository(result.get("repository", {}))
    lines += _checks(result.get("checks", {}))
    lines += _compute(result.get("compute", {}))
    lines += _served(result.get("served", {}))
    lines += _workers(result.get("workers", {}))
    lines += _not_measured(run, result)
    return "\n".join(lines).rstrip() + "\n"


def _device(device: dict[str, Any], wheels: dict[str, Any]) -> list[str]:
    lines = ["## Device", ""]
    torch = device.get("torch", {})
    for gpu in torch.get("gpus", []):
        lines.append(
            f"- GPU: {gpu['name']}, {gpu['memory_gib']} GiB, compute capability "
            f"{gpu['capability']}, {gpu['multiprocessors']} SMs"
        )
    driver = device.get("driver", {})
    if driver.get("driver"):
        lines.append(f"- driver {driver['driver']}, CUDA (driver) {driver.get('cuda_driver', '?')}")
    if torch:
        lines.append(
            f"- torch {torch['version']} (CUDA build {torch.get('cuda_build')}, cuDNN "
            f"{torch.get('cudnn', '-')}; TF32 matmul {torch['tf32_matmul']}, TF32 cuDNN "
            f"{torch['tf32_cudnn']}); CUDA available: {torch['cuda_available']}"
        )
    ort = device.get("onnxruntime", {})
    if ort:
        lines.append(f"- onnxruntime {ort['version']}, providers: {', '.join(ort['providers'])}")
    if device.get("onnx_not_measured"):
        lines.append(f"- **{device['onnx_not_measured']}**")
    carried = [w for w in wheels.get("wheels", []) if w["action"] == "installed"]
    if carried:
        lines.append(
            "- carried wheels installed: "
            + ", ".join(f"{w['package']} {w['carried']} ({w['why']})" for w in carried)
        )
    machine = device.get("machine", {})
    if machine:
        lines.append(
            f"- CPU: {machine.get('cpu')}, {machine.get('cores')} cores; "
            f"Python {device.get('python')}"
        )
    return [*lines, ""]


def _repository(repository: dict[str, Any]) -> list[str]:
    rows = []
    for seed, about in repository.get("seeds", {}).items():
        steps = about.get("training_step", [])
        exports = ", ".join(
            f"{precision} {_export(e)}" for precision, e in about.get("exports", {}).items()
        )
        rows.append(
            [
                seed,
                about["arch"],
                about["train_images"],
                about["epoch_s"],
                f"{about['test_accuracy']:.2%}",
                "; ".join(
                    f"b{s['batch']}: {s['ms']:.2f} ms ({s['images_per_s']:,} img/s)" for s in steps
                ),
                exports,
            ]
        )
    return [
        "## Repository (synthetic data, 1 epoch on the device)",
        "",
        *_table(
            ["seed", "arch", "train images", "epoch s", "test acc", "training step", "exports"],
            rows,
        ),
    ]


def _export(outcome: dict[str, Any]) -> str:
    if "error" in outcome:
        return f"failed: {outcome['error']}"
    if "left out" in outcome:
        return f"left out ({outcome['left out']})"
    return f"{outcome['seconds']} s"


def _checks(checks: dict[str, Any]) -> list[str]:
    load_time = checks.get("load_time", {})
    rows = []
    for name, row in checks.get("parity", {}).items():
        state = load_time.get(name, {})
        loaded = state.get("state", "-")
        if state.get("reason") and loaded != "READY":
            loaded += f": {state['reason']}"
        if "skipped" in row:
            rows.append(
                [name, row["runtime"], row["precision"], "skipped", None, None, None, loaded]
            )
            continue
        rows.append(
            [
                name,
                row["runtime"],
                row["precision"],
                _sci(row["device_vs_cpu"]),
                _sci(row["device_vs_reference"]),
                f"{row['tolerance']:g}",
                f"{row['top1_agreement']:.0%}",
                loaded,
            ]
        )
    lines = [
        "## Parity and the load-time reference check",
        "",
        "Largest absolute difference of the probabilities on the reference images.",
        "",
        *_table(
            [
                "model",
                "runtime",
                "precision",
                "device vs CPU",
                "vs reference",
                "tolerance",
                "top-1 agree",
                "load-time check",
            ],
            rows,
        ),
    ]
    if checks.get("suggested_tolerance"):
        lines += [
            f"The servers of the later steps ran with --reference-tolerance "
            f"{checks['suggested_tolerance']:g} so that every version could be measured.",
            "",
        ]
    return lines


def _compute(compute: dict[str, Any]) -> list[str]:
    rows = [
        [
            r["model"],
            r["runtime"],
            r["precision"],
            r["batch"],
            _num(r["images_per_s"], 0),
            _num(r["p50_ms"], 3),
            _num(r["p99_ms"], 3),
        ]
        for r in compute.get("rows", [])
    ]
    return [
        "## Compute alone (the model file run directly, host arrays in and out)",
        "",
        *_table(["model", "runtime", "precision", "batch", "images/s", "p50 ms", "p99 ms"], rows),
    ]


def _served(served: dict[str, Any]) -> list[str]:
    rows = [
        [
            r["model"],
            r["runtime"],
            r["precision"],
            r["images"],
            r["concurrency"],
            _num(r["images_per_s"], 0),
            _num(r["requests_per_s"], 0),
            _num(r["p50_ms"], 2),
            _num(r["p99_ms"], 2),
            _num(r["mean_batch"], 1),
            _errors(r["errors"]),
        ]
        for r in served.get("rows", [])
    ]
    timing = served.get("timing_s", {})
    head = "## Served (one server process; KServe v2 ModelInfer over gRPC)"
    lines = [head, ""]
    if timing:
        lines += [
            f"Closed loop, {timing['duration']:g} s per point after {timing['warmup']:g} s of "
            f"warm-up, {served.get('client_processes')} client process(es).",
            "",
        ]
    return lines + _table(
        [
            "model",
            "runtime",
            "precision",
            "img/req",
            "conc",
            "images/s",
            "req/s",
            "p50 ms",
            "p99 ms",
            "mean batch",
            "errors",
        ],
        rows,
    )


def _workers(workers: dict[str, Any]) -> list[str]:
    rows = [
        [
            r["workers"],
            _num(r["images_per_s"], 0),
            _num(r["p50_ms"], 2),
            _num(r["p99_ms"], 2),
            _num(r["mean_batch"], 1),
            r["gpu_memory_per_worker_mib"],
            _num(r["gpu_utilisation_mean"], 0),
            _num(r["gpu_utilisation_max"], 0),
            _num(r["server_cpu_cores"], 2),
            _errors(r["errors"]),
        ]
        for r in workers.get("rows", [])
    ]
    lines = ["## Workers on one device", ""]
    if workers.get("model"):
        lines += [
            f"{workers['model']}, {workers['images']} images per request, concurrency "
            f"{workers['concurrency']} over {workers['client_processes']} client processes.",
            "",
        ]
    lines += _table(
        [
            "workers",
            "images/s",
            "p50 ms",
            "p99 ms",
            "mean batch",
            "GPU MiB/worker",
            "GPU util % (mean)",
            "max",
            "server cores",
            "errors",
        ],
        rows,
    )
    decision = workers.get("decision")
    if decision:
        chosen = decision["workers"]
        head = (
            f"--workers auto on CUDA: **{chosen}**"
            if chosen
            else "--workers auto on CUDA: **not decided**"
        )
        lines += [f"{head}. {decision['note']}.", ""]
    return lines


def _not_measured(run: dict[str, Any], result: dict[str, Any]) -> list[str]:
    notes = []
    device = result.get("device", {})
    if device.get("onnx_not_measured"):
        notes.append(device["onnx_not_measured"])
    for step in run["steps"]:
        if step["status"] != "ok":
            notes.append(f"step {step['name']}: {step['status']}: {step.get('note', '')}")
    for name in ("served", "workers"):
        if result.get(name, {}).get("skipped"):
            notes.append(f"{name}: skipped for time: {result[name]['skipped']}")
    if run.get("device") != "cuda":
        notes.append("no CUDA device: nothing in this run was measured on a GPU")
    return ["## Not measured", "", *[f"- {note}" for note in notes], ""] if notes else []
