"""`python -m benchmarks gpu`, rehearsed on the CPU: the whole command (real training, export,
servers and clients) with --device cpu --quick, once with this environment and once with a
Python laid out like the GPU machine's plus the carried wheels; the time boxes against steps
that hang; the carried wheels' list, tags, size and unpacking."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from gpu_machine import NOT_ON_THE_MACHINE, machine_like_python

from benchmarks.gpu import wheels
from benchmarks.gpu.cli import REPORT_RESERVE_S, TIMED_OUT, run_check
from benchmarks.gpu.context import OK
from benchmarks.gpu.report import LOG_FILE, RESULTS_FILE, SUMMARY_FILE
from benchmarks.gpu.steps import STEPS, StepSpec, run_boxed

ROOT = Path(__file__).resolve().parent.parent
# The rehearsal's budget: the command cuts every step to it, so the test cannot run longer.
# About a minute on a quiet 2-core machine; the margin is for a machine shared with others.
REHEARSAL_BUDGET_S = 150
OUT_FILES = {RESULTS_FILE, SUMMARY_FILE, LOG_FILE}
CARRIED_AND_MISSING = {
    "grpcio-health-checking",
    "grpcio-reflection",
    "tqdm",
    "onnxscript",
    "onnx-ir",
    "pygrpc-native",
}
# What pip says when the registry cannot be reached (then the wheel tests skip, saying so).
UNREACHABLE = re.compile(
    r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|"
    r"Network is unreachable|ProxyError|No matching distribution found"
)
# A step that records a partial result, starts a process of its own, and hangs.
HANG = """
import json, subprocess, sys, time
from pathlib import Path
from benchmarks.gpu.context import Context
context = Context.load(Path(sys.argv[2]))
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
context.results.mkdir(parents=True, exist_ok=True)
partial = {"status": "running", "reached": 1, "grandchild": child.pid}
(context.results / f"{sys.argv[1]}.json").write_text(json.dumps(partial))
print("hanging", flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting for its reaper does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def hang(step: StepSpec, context: Path) -> list[str]:
    return [sys.executable, "-c", HANG, step.name, str(context)]


def rehearse(python: Path | str, out: Path, wheels_dir: Path) -> dict:
    """The real command, as the docs give it, with --device cpu --quick; its results.json."""
    command = [
        str(python), "-m", "benchmarks", "gpu", "--device", "cpu", "--quick", "--out", str(out),
        "--wheels", str(wheels_dir), "--budget-s", str(REHEARSAL_BUDGET_S),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    began = time.monotonic()
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=REHEARSAL_BUDGET_S + 60
    )
    wall = time.monotonic() - began
    assert wall < REHEARSAL_BUDGET_S + 10, f"the rehearsal took {wall:.0f} s"
    assert done.returncode == 0, done.stderr[-4000:]
    assert set(os.listdir(out)) == OUT_FILES  # at most 8 files, no folder
    return json.loads((out / RESULTS_FILE).read_text())


def assert_every_step_reports(results: dict) -> None:
    steps = results["steps"]
    assert [s["name"] for s in steps] == [s.name for s in STEPS]
    for step in steps:
        assert step["status"] == OK, step
        assert step["note"] and step["seconds"] > 0 and step["result"]["status"] == OK


def table_rows(summary: str, heading: str) -> list[list[str]]:
    """The data rows of the first table under `heading` in summary.md."""
    section = summary.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


def test_rehearsal_on_the_cpu_writes_every_file_and_every_step_reports(tmp_path: Path) -> None:
    results = rehearse(sys.executable, tmp_path / "out", tmp_path / "no-wheels")
    assert_every_step_reports(results)
    assert results["device"] == "cpu" and results["quick"]
    summary = (tmp_path / "out" / SUMMARY_FILE).read_text()
    served = table_rows(summary, "Served")
    # Both seed models, both runtimes, fp32 and fp16, at 1, 8 and 64 images per request
    # (--quick: cifar10 in fp32 on TorchScript only).
    assert {(row[0], row[1], row[2]) for row in served} == {
        ("fashion_mnist", "onnx", "fp32"), ("fashion_mnist_ts", "torchscript", "fp32"),
        ("fashion_mnist_fp16", "onnx", "fp16"), ("fashion_mnist_fp16_ts", "torchscript", "fp16"),
        ("cifar10_ts", "torchscript", "fp32"),
    }  # fmt: skip
    assert {row[3] for row in served} == {"1", "8", "64"}
    for row in served:  # images/s, p50, p99 and the mean formed batch are figures
        assert number(row[5]) > 0 and number(row[7]) > 0 and number(row[8]) >= number(row[7])
        assert number(row[9]) >= 1 and row[10] == "0"
    compute = table_rows(summary, "Compute alone")
    # --quick: one concurrency, so as many served points as models x batch sizes.
    assert len(compute) == len(served) and all(number(row[4]) > 0 for row in compute)
    parity = table_rows(summary, "Parity")
    assert parity and all(row[-1] == "READY" for row in parity)
    workers = table_rows(summary, "Workers")
    assert [row[0] for row in workers] == ["1", "2"] and all(number(r[1]) > 0 for r in workers)
    assert "--workers auto on CUDA: **not decided**. not measured on a CUDA device" in summary
    assert "no CUDA device: nothing in this run was measured on a GPU" in summary


@pytest.fixture(scope="module")
def wheels_for_this_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make gpu-wheels`'s own download, for this machine's Python: the GPU machine's cp312
    wheels of grpcio and ml-dtypes cannot install on 3.11, the same list for 3.11 can."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return download_wheels(tmp_path_factory.mktemp("wheels"), version)


def download_wheels(folder: Path, python_version: str) -> Path:
    """Run `make gpu-wheels` into `folder`; skip (saying why) only when no registry answers."""
    command = [
        "make", "--no-print-directory", "-o", ".venv/.installed", "gpu-wheels",
        f"GPU_WHEELS={folder}", f"GPU_PYTHON_VERSION={python_version}",
    ]  # fmt: skip
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.skip("the package registry did not answer `make gpu-wheels` within 240 s")
    if done.returncode != 0 and UNREACHABLE.search(done.stdout + done.stderr):
        pytest.skip(f"the package registry is unreachable: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stdout + done.stderr
    return folder


@pytest.fixture(scope="module")
def gpu_like_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return machine_like_python(tmp_path_factory.mktemp("python"))


def test_rehearsal_runs_on_a_python_laid_out_like_the_gpu_machine(
    tmp_path: Path, wheels_for_this_python: Path, gpu_like_python: Path
) -> None:
    """What the GPU machine lacks is missing here too, so a module of the server, the client,
    the training or this benchmark that imports it unguarded fails this test; the carried
    wheels fill exactly that gap (a venv of links to the machine's packages: versions and the
    GPU itself are not imitated)."""
    python = gpu_like_python
    probe = "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m)])"
    found = subprocess.run(
        [python, "-c", probe, *NOT_ON_THE_MACHINE], capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "[]"

    results = rehearse(python, tmp_path / "out", wheels_for_this_python)
    assert_every_step_reports(results)
    rows = {row["package"]: row for row in results["steps"][0]["result"]["wheels"]}
    assert {name for name, row in rows.items() if row["action"] == "installed"} == (
        CARRIED_AND_MISSING
    )
    assert all(
        row["action"] == "kept" for name, row in rows.items() if name not in CARRIED_AND_MISSING
    )
    packages = results["steps"][1]["result"]["packages"]
    for module in ("tqdm", "onnxscript", "grpc_health", "grpc_reflection"):
        assert packages[module]["from"] == "carried", (module, packages[module])
    assert packages["torch"]["from"] == "this Python"


EXPORT_WITHOUT_ONNXSCRIPT = """
import json, sys
from pathlib import Path
from benchmarks.gpu.context import Context, Recorder
from benchmarks.gpu.repository import export
from training.train import train
work = Path(sys.argv[1])
trained = train(
    "fashion_mlp", "synthetic", checkpoint_dir=work / "checkpoints", epochs=1, device="cpu",
    synthetic_train_size=200, synthetic_test_size=50, progress=False, log=lambda line: None,
)
record = Recorder(Context(str(work), "cpu", True, 60.0, "", ""), "repository")
built = [export(work / "repository", "fashion_mnist", p, trained, record) for p in ("fp32", "fp16")]
print(json.dumps(built))
"""


def test_without_the_onnx_exporter_fp32_still_gets_its_torchscript_version(
    tmp_path: Path, wheels_for_this_python: Path, gpu_like_python: Path
) -> None:
    """The GPU machine's torch with an exporter that fails there (here: onnxscript not
    carried, the rest of what training needs is): the run keeps fp32 on TorchScript."""
    site = tmp_path / "site"
    wheels.unpack(next(wheels_for_this_python.glob("tqdm-*.whl")), site)
    done = subprocess.run(
        [gpu_like_python, "-c", EXPORT_WITHOUT_ONNXSCRIPT, str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (fp32, fp32_errors), (fp16, fp16_errors) = json.loads(done.stdout.splitlines()[-1])
    assert fp32 == {"fashion_mnist_ts": "torchscript"} and fp16 == {}
    assert "ONNX export failed" in fp32_errors[0] and len(fp32_errors) == 1
    assert "ONNX export failed" in fp16_errors[0]
    assert (tmp_path / "repository" / "fashion_mnist_ts" / "1" / "model.pt").is_file()


def test_gpu_wheels_fit_the_gpu_machine(tmp_path: Path) -> None:
    """The folder `make gpu-wheels` fills (gpu-wheels/ when it is there, else a fresh download):
    every wheel installs on CPython 3.12 on manylinux x86-64, all of the list, under 60 MiB."""
    folder = ROOT / "gpu-wheels"
    if not folder.is_dir():
        folder = download_wheels(tmp_path / "gpu-wheels", "3.12")
    wanted = wheels.requirements(wheels.declared())
    assert wheels.check(folder, (3, 12), wanted) == []
    found = wheels.wheels_in(folder)
    assert sorted(w.name for w in found) == sorted(
        wheels.normalize(spec.split("==")[0]) for spec in wanted
    )
    for wheel in found:
        assert wheels.unfit(wheel, (3, 12)) is None, wheel.path.name  # cp312, abi3, py3
        assert all(p == "any" or p.startswith("manylinux") for p in wheel.platforms)
        assert all(p == "any" or p.endswith("_x86_64") for p in wheel.platforms)
    assert sum(w.path.stat().st_size for w in found) < wheels.MAX_TOTAL_BYTES


def test_carried_list_follows_pyproject(tmp_path: Path) -> None:
    carried = wheels.requirements(wheels.declared())
    names = {wheels.normalize(spec.split("==")[0]) for spec in carried}
    assert CARRIED_AND_MISSING | {"grpcio", "protobuf", "ml-dtypes"} <= names
    assert not names & wheels.ON_THE_MACHINE
    assert not any(name.startswith(("opentelemetry", "matplotlib")) for name in names)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[^=]+", spec) for spec in carried)
    # A dependency the server gains (a native gRPC transport) travels without a code change.
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\ndependencies = ["grpcio==1.85.1", "pygrpc-native==0.4.0", '
        '"opentelemetry-api==1.45.2", "numpy>=1.26,<3"]\n'
        '[project.optional-dependencies]\ntrain = ["torch==2.14.1", "tqdm>=4.66,<5"]\n'
    )
    assert wheels.requirements(wheels.declared(pyproject), lambda name: "9.9") == [
        "grpcio==1.85.1", "pygrpc-native==0.4.0", "tqdm==9.9", "onnx-ir==9.9", "ml-dtypes==9.9"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "python", "fits"),
    [
        ("grpcio-1.85.1-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", (3, 12), True),
        (
            "grpcio-1.85.1-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
            (3, 11),
            False,
        ),
        ("protobuf-6.33.6-cp39-abi3-manylinux2014_x86_64.whl", (3, 12), True),
        ("tqdm-4.70.1-py3-none-any.whl", (3, 12), True),
        (
            "ml_dtypes-0.5.4-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
            (3, 12),
            True,
        ),
        ("x-1.0-cp312-cp312-manylinux_2_34_x86_64.whl", (3, 12), False),
        ("x-1.0-cp312-cp312-manylinux2014_aarch64.whl", (3, 12), False),
        ("x-1.0-cp312-cp312-win_amd64.whl", (3, 12), False),
        ("x-1.0-cp313-abi3-manylinux2014_x86_64.whl", (3, 12), False),
    ],
)
def test_wheel_tags_that_fit(name: str, python: tuple[int, int], fits: bool) -> None:
    assert (wheels.unfit(wheels.parse_wheel(Path(name)), python) is None) == fits


def make_wheel(folder: Path, name: str, version: str) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}/__init__.py", f"VERSION = {version!r}\n")
        archive.writestr(f"{name}-{version}.data/purelib/{name}_extra.py", "EXTRA = 1\n")
        archive.writestr(f"{name}-{version}.data/scripts/{name}", "#!/bin/sh\n")
        archive.writestr(
            f"{name}-{version}.dist-info/METADATA", f"Name: {name}\nVersion: {version}\n"
        )
    return path


def test_install_unpacks_only_what_this_python_lacks_or_has_older(tmp_path: Path) -> None:
    folder, target = tmp_path / "wheels", tmp_path / "site"
    folder.mkdir()
    for name in ("absent", "older", "newer"):
        make_wheel(folder, name, "2.0.0")
    here = {"older": "1.9.9", "newer": "2.0.0"}
    rows = wheels.install(folder, target, (3, 12), here.get)
    assert {row["package"]: row["action"] for row in rows} == {
        "absent": "installed", "older": "installed", "newer": "kept"
    }  # fmt: skip
    assert (target / "absent" / "__init__.py").read_text() == "VERSION = '2.0.0'\n"
    assert (target / "absent_extra.py").is_file()  # .data/purelib beside the package
    assert (target / "absent-2.0.0.dist-info" / "METADATA").is_file()
    assert (
        not (target / "newer").exists() and not (target / "absent").joinpath("..", "bin").exists()
    )
    found = subprocess.run(
        [sys.executable, "-c", "import absent, older; print(absent.VERSION, older.VERSION)"],
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.split() == ["2.0.0", "2.0.0"]


def test_time_box_stops_a_hanging_step_and_what_it_started(tmp_path: Path) -> None:
    context = tmp_path / "context.json"
    from benchmarks.gpu.context import Context

    Context(str(tmp_path), "cpu", True, 1.0, "", "").save(context)
    lines: list[str] = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    finished = run_boxed(hang(STEPS[0], context), 2.0, cwd=str(ROOT), env=env, on_line=lines.append)
    assert finished.timed_out and 2.0 <= finished.seconds < 8.0
    assert lines == ["hanging"]
    grandchild = json.loads((tmp_path / "steps" / "wheels.json").read_text())["grandchild"]
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(grandchild)


def test_every_step_is_time_boxed_and_the_run_still_writes_its_results(tmp_path: Path) -> None:
    boxed = [replace(step, quick_box_s=1.5, needs_models=False) for step in STEPS]
    began = time.monotonic()
    run = run_check(
        tmp_path / "out",
        device="cpu",
        quick=True,
        work=tmp_path / "work",
        steps=boxed,
        command=hang,
    )
    assert time.monotonic() - began < len(STEPS) * 6
    assert [(s["name"], s["status"]) for s in run["steps"]] == [(s.name, TIMED_OUT) for s in STEPS]
    for step in run["steps"]:
        assert step["result"]["reached"] == 1  # what it recorded before the box ended is kept
        assert not alive(step["result"]["grandchild"])
        assert "time box" in step["note"]
    saved = json.loads((tmp_path / "out" / RESULTS_FILE).read_text())
    assert [s["status"] for s in saved["steps"]] == [TIMED_OUT] * len(STEPS)
    summary = (tmp_path / "out" / SUMMARY_FILE).read_text()
    assert summary.count(f"| {TIMED_OUT} |") == len(STEPS)


def test_a_step_that_hangs_does_not_stop_the_next_one(tmp_path: Path) -> None:
    by_name = {step.name: step for step in STEPS}
    steps = [replace(by_name["device"], quick_box_s=1.5), by_name["wheels"]]

    def command(step: StepSpec, context: Path) -> list[str]:
        if step.name == "device":
            return hang(step, context)
        return [sys.executable, "-m", "benchmarks.gpu.child", step.name, str(context)]

    run = run_check(
        tmp_path / "out",
        quick=True,
        wheels=tmp_path / "none",
        work=tmp_path / "work",
        steps=steps,
        command=command,
    )
    assert [s["status"] for s in run["steps"]] == [TIMED_OUT, OK]
    assert run["device"] == "cpu"  # auto, undecided by the device step: the CPU, and said so
    assert "the device step did not finish" in " ".join(run["problems"])
    assert "no carried wheels" in run["steps"][1]["note"]


def test_the_budget_cuts_the_boxes_and_skips_what_does_not_fit(tmp_path: Path) -> None:
    steps = [StepSpec("first", "hangs", 60, 60), StepSpec("second", "never starts", 60, 60)]
    began = time.monotonic()
    run = run_check(
        tmp_path / "out", budget_s=20, work=tmp_path / "work", steps=steps, command=hang
    )
    assert time.monotonic() - began < 20
    first, second = run["steps"]
    assert first["status"] == TIMED_OUT and first["box_s"] <= 20 - REPORT_RESERVE_S
    assert second["status"] == "skipped" and "too few" in second["note"]
