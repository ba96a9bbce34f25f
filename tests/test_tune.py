"""`python -m benchmarks tune` end to end against real servers, and its search on its own.

The end-to-end runs are small (one load point, half a second each, a few settings) and made so
that the choice does not depend on a noisy machine: a start whose queue delay is absurd loses
to any sane one, and a batch size the model cannot take is refused by the server itself.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from generated_models import write_fixed_batch_model
from server_process import PROJECT_ROOT, ServerProcess, copy_repository

from benchmarks.tune.apply import Refused, apply_config
from benchmarks.tune.load import LoadPoint, PointResult
from benchmarks.tune.search import (
    MEASURED,
    REJECTED,
    Budget,
    Evaluation,
    Search,
    Trial,
    early_stop,
    finals_measurements,
)
from benchmarks.tune.space import Setting, Space, default_space, powers_of_two
from modelrepo.config import parse_config
from modelrepo.config_edit import set_value
from modelrepo.layout import CONFIG_FILE

MODEL = "fashion_mnist"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# One small load point, short rounds: seconds per setting on 2 cores.
QUICK = (
    "--concurrency", "1", "--images", "1", "--duration", "0.5", "--warmup", "0.2",
    "--load-generator", "python", "--client-processes", "1",
)  # fmt: skip
# Every dimension fixed but the one a test searches.
FIXED = ("--workers", "1", "--instances", "1", "--threads", "1")


def run_tune(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", "tune", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# --- end to end ------------------------------------------------------------------------------


def test_tune_applies_settings_the_server_then_serves(
    model_repository: Path, tmp_path: Path
) -> None:
    """A start that makes every request wait 300 ms loses to 100 us; --apply writes only that
    value into the operator's file (a comment and a Triton field this server does not read
    stay), and a real server started on the tuned repository serves it."""
    repo = copy_repository(model_repository, tmp_path / "repo", [MODEL])
    config = repo / MODEL / CONFIG_FILE
    text = "# tuned by hand, once\n" + config.read_text()
    text += 'model_warmup [ { name: "zeros" batch_size: 1 } ]  # for Triton\n'
    text = set_value(text, ("dynamic_batching", "max_queue_delay_microseconds"), "300000")
    config.write_text(text)
    out = tmp_path / "out"
    done = run_tune(
        "--model-repository", str(repo), "--model", MODEL, *QUICK, *FIXED,
        "--max-batch-size", "64", "--max-queue-delay-us", "100",
        "--p99-ms", "250", "--budget-s", "60", "--out", str(out), "--apply",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    written = config.read_text()
    expected = parse_config(text)
    expected.dynamic_batching.max_queue_delay_microseconds = 100
    assert parse_config(written) == expected
    assert written == text.replace(
        "max_queue_delay_microseconds: 300000", "max_queue_delay_microseconds: 100"
    )  # the rest byte for byte: comments and the field this server does not read
    assert not [p for p in (repo / MODEL).iterdir() if p.name.startswith(".")]  # no temp file

    report = json.loads((out / "results.json").read_text())
    outcome = report["outcome"]
    assert outcome["start"]["max_queue_delay_us"] == 300000
    assert outcome["chosen"]["max_queue_delay_us"] == 100 and outcome["feasible"]
    assert outcome["config_before"] == text and outcome["config_chosen"] == written
    trials = report["trials"]
    assert [(t["setting"], t["round"]) for t in trials][:2] == [
        ("w1 i1 t1 b64 d300000", 0),
        ("w1 i1 t1 b64 d100", 0),
    ]
    assert {t["status"] for t in trials} == {"measured"}
    assert {t["round"] for t in trials} == {0, 1, 2, 3}  # the finals: both, three times
    start = [t["points"]["c1x1"] for t in trials if t["setting"].endswith("d300000")]
    chosen = [t["points"]["c1x1"] for t in trials if t["setting"].endswith("d100")]
    assert all(p["p99_ms"] > 250 for p in start)  # every request waits 300 ms: over budget
    assert all(p["p99_ms"] < 250 and p["images_per_s"] > 0 for p in chosen)
    assert outcome["score"] > 5  # against a request every 300 ms
    assert (out / "tune.png").read_bytes()[:8] == PNG_MAGIC
    assert "CHOSEN" in done.stdout and "Chose 1 worker(s)" in done.stdout
    assert "--workers 1 (or SERVER_WORKERS=1)" in done.stdout
    assert "wrote" in done.stdout and "+  max_queue_delay_microseconds: 100" in done.stdout

    with ServerProcess(repo, "--models", MODEL) as server:
        client = triton.InferenceServerClient(server.target)
        try:
            served = client.get_model_config(MODEL).config
            assert served.dynamic_batching.max_queue_delay_microseconds == 100
            images = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
            request = triton.InferInput("input", list(images.shape), "FP32")
            request.set_data_from_numpy(images)
            answer = client.infer(MODEL, [request]).as_numpy("probabilities")
        finally:
            client.close()
    assert answer.shape == (2, 10) and np.allclose(answer.sum(axis=1), 1, atol=1e-4)


def test_tune_never_writes_a_config_the_server_rejects(tmp_path: Path) -> None:
    """A model exported with a fixed batch of one: the server refuses max_batch_size 4, so the
    tuner keeps 1, and the gate before writing refuses the text outright."""
    repo = tmp_path / "repo"
    model_dir = write_fixed_batch_model(repo, "fixed", max_batch_size=1)
    before = files_of(model_dir)
    original = before[CONFIG_FILE].decode()
    common = ("--model-repository", str(repo), "--model", "fixed", *QUICK, *FIXED)
    done = run_tune(
        *common, "--max-batch-size", "1,4", "--max-queue-delay-us", "0",
        "--budget-s", "60", "--out", str(tmp_path / "out"), "--apply",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "w1 i1 t1 b4 d0: rejected: the server refused it" in done.stderr
    assert "warm-up at batch 4 failed" in done.stderr
    assert "nothing to write" in done.stdout
    assert files_of(model_dir) == before
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    statuses = {t["setting"]: t["status"] for t in report["trials"]}
    assert statuses == {"w1 i1 t1 b1 d0": "measured", "w1 i1 t1 b4 d0": "rejected"}
    assert report["outcome"]["chosen"]["max_batch_size"] == 1

    # The gate --apply passes every config through: the server's own loading, before a write.
    with pytest.raises(Refused, match="would not load version 1: warm-up at batch 4 failed"):
        apply_config(model_dir, original, set_value(original, ("max_batch_size",), "4"), ())
    assert files_of(model_dir) == before
    with pytest.raises(Refused, match="changed while the tuner ran"):
        apply_config(model_dir, original + "# edited meanwhile\n", original, ())

    # A model the server does not load as it is configured: nothing measured, nothing written.
    broken = set_value(original, ("max_batch_size",), "4")
    (model_dir / CONFIG_FILE).write_text(broken)
    done = run_tune(*common, "--max-batch-size", "1,4", "--budget-s", "60", "--apply")
    assert done.returncode == 1
    assert "cannot tune the model as it is configured now: the server refused it" in done.stderr
    assert (model_dir / CONFIG_FILE).read_text() == broken


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_tune_interrupted_leaves_the_config_whole_and_resumes(
    model_repository: Path, tmp_path: Path
) -> None:
    """Ctrl-C mid-search: the config is untouched, results.json holds what was measured, and
    --resume replays it (no new measurement of those settings) and finishes."""
    repo = copy_repository(model_repository, tmp_path / "repo", [MODEL])
    before = files_of(repo / MODEL)
    out = tmp_path / "out"
    args = (
        "--model-repository", str(repo), "--model", MODEL, *QUICK, *FIXED,
        "--max-batch-size", "8,16,32,64,128", "--max-queue-delay-us", "0",
        "--budget-s", "120", "--out", str(out), "--apply",
    )  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "tune", *args],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A suite started in the background (`make test &`) inherits SIGINT ignored, and so
        # would the tuner, which is then never interrupted: Ctrl-C is what is tested here.
        preexec_fn=_sigint_default,
    )
    results = out / "results.json"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and process.poll() is None:
        if results.exists() and json.loads(results.read_text())["trials"]:
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr and "--resume" in stderr
    assert files_of(repo / MODEL) == before
    recorded = json.loads(results.read_text())["trials"]
    assert recorded and "outcome" not in json.loads(results.read_text())

    done = run_tune(*args, "--p99-ms", "5", "--resume")  # another budget: another search
    assert done.returncode == 1 and "another p99_ms" in done.stderr

    done = run_tune(*args, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{len(recorded)} recorded measurement(s) replayed" in done.stderr
    report = json.loads(results.read_text())
    assert report["trials"][: len(recorded)] == recorded  # replayed, not measured again
    assert len(report["trials"]) > len(recorded) and "outcome" in report


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) not found")
def test_tune_with_h2load_counts_what_the_server_answered(tmp_path: Path) -> None:
    """The lean load generator: latencies from h2load's log, answers by gRPC code from the
    server's metrics; one setting, two load points, two worker counts."""
    repo = tmp_path / "repo"
    write_fixed_batch_model(repo, "fixed", max_batch_size=1)
    out = tmp_path / "out"
    done = run_tune(
        "--model-repository", str(repo), "--model", "fixed", "--concurrency", "1", "4",
        "--images", "1", "--duration", "0.5", "--warmup", "0.2", "--load-generator", "h2load",
        "--workers", "1,2", "--instances", "1", "--threads", "1", "--max-batch-size", "1",
        "--max-queue-delay-us", "0", "--finalists", "1", "--budget-s", "60", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["context"]["load_generator"] == "h2load"
    trials = {t["setting"]: t for t in report["trials"]}
    assert set(trials) == {"w1 i1 t1 b1 d0", "w2 i1 t1 b1 d0"}
    assert trials["w2 i1 t1 b1 d0"]["status"] == "measured"  # the start: never stopped early
    for trial in trials.values():
        assert trial["status"] in ("measured", "stopped early") and trial["points"]
        for point in trial["points"].values():
            assert point["requests"] > 0 and point["errors"] == {}
            assert 0 < point["p50_ms"] <= point["p99_ms"]
            assert point["server_cpu_cores"] > 0


def test_bad_options_are_refused_in_one_line(model_repository: Path, tmp_path: Path) -> None:
    repo = copy_repository(model_repository, tmp_path / "repo", [MODEL, "fashion_mnist_ts"])
    common = ("--model-repository", str(repo), *QUICK)
    for args, message in (
        (("--model", MODEL, "--server-args=--workers 2"), "may not set --workers"),
        (("--model", MODEL, "--max-batch-size", "0,8"), "at least 1"),
        (("--model", "fashion_mnist_ts", "--threads", "1,2"), "TorchScript"),
        (("--model", "missing"), "no model 'missing'"),
        (("--model", MODEL, "--budget-s", "1"), "does not fit one measurement"),
        (("--model", MODEL, "--resume", "--out", str(tmp_path / "none")), "nothing to resume"),
    ):
        done = run_tune(*common, *args, timeout=60)
        assert done.returncode in (1, 2), args
        assert message in done.stderr, (args, done.stderr[-1000:])
        assert "Traceback" not in done.stderr


# --- the search on its own -------------------------------------------------------------------

POINT = LoadPoint(32, 1)


def surface(setting: Setting) -> float:
    """A made-up machine: best at 2 workers, 2 instances, 1 thread, batch 32, no delay."""
    value = 1000.0
    value *= {1: 0.6, 2: 1.0, 4: 0.7}[setting.workers]
    value *= {1: 0.8, 2: 1.0, 4: 0.9}[setting.instances]
    value *= {1: 1.0, 2: 0.85, 4: 0.6}[setting.threads]
    value *= 1.0 - 0.1 * abs(math.log2(setting.max_batch_size / 32))
    value *= 1.0 - 0.05 * math.log2(1 + setting.max_queue_delay_us / 100)
    return value


class Machine:
    """Measurements from `surface`, a second each on its own clock; p99 over the budget at
    batch 128; batch 8 rejected by the server."""

    def __init__(self) -> None:
        self.measured: list[tuple[Setting, int]] = []
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def measure(self, setting: Setting, round_: int, _bar: object) -> Trial:
        self.measured.append((setting, round_))
        self.now += 1.0
        if setting.max_batch_size == 8:
            return Trial(setting, round_, REJECTED, reason="refused")
        p99 = 500.0 if setting.max_batch_size == 128 else 10.0
        result = PointResult(surface(setting), 100, 1.0, p99, {}, 1.0)
        return Trial(setting, round_, MEASURED, {POINT.label: result})


def space() -> Space:
    return Space((1, 2, 4), (1, 2, 4), (1, 2, 4), (8, 16, 32, 64, 128), (0, 100, 500), cpus=4)


def search(
    machine: Machine,
    seconds: float = 1e6,
    min_gain: float = 0.02,
    recorded: Sequence[Trial] = (),
) -> Search:
    """From 1 worker, 1 instance, 1 thread, batch 64, 500 us; p99 budget 100 ms."""
    return Search(
        space(),
        Setting(1, 1, 1, 64, 500),
        p99_budget_ms=100.0,
        min_gain=min_gain,
        finalists=3,
        measure=machine.measure,
        estimate=lambda _setting: 1.0,
        budget=Budget(seconds, 0.0, clock=machine.clock),
        recorded=recorded,
    )


def test_search_finds_the_best_setting_without_trying_them_all() -> None:
    machine = Machine()
    outcome = search(machine).run()
    assert outcome.chosen == Setting(2, 2, 1, 32, 0) and outcome.feasible
    tried = {s for s, _ in machine.measured}
    assert len(tried) <= 20 < space().size()  # 405 settings
    assert Setting(2, 2, 1, 8, 0) not in outcome.finalists  # rejected: never a contender
    assert all(s.max_batch_size != 128 for s in outcome.finalists)  # over the p99 budget
    # The finals took the measurements the budget keeps for them: 3, then 2 twice.
    assert sum(1 for _, round_ in machine.measured if round_) == finals_measurements(3) == 7
    assert outcome.final_rounds == 3 and [m.dimension for m in outcome.moves][:2] == [
        "workers",
        "instances",
    ]
    # Replayed from its record, the same run measures nothing and decides the same.
    again = Machine()
    replayed = search(again, recorded=outcome.trials).run()
    assert again.measured == [] and replayed.chosen == outcome.chosen


def test_search_keeps_the_start_unless_a_setting_beats_it_by_the_margin() -> None:
    """With a margin wider than any gain on the surface, nothing replaces the start."""
    outcome = search(Machine(), min_gain=5.0).run()
    assert outcome.chosen == outcome.start and outcome.moves == []


def test_a_challenger_must_win_most_rounds_side_by_side() -> None:
    """Ahead on the medians thanks to two lucky rounds, behind in two of the three rounds of
    the finals: the start stays."""
    start, challenger = Setting(1, 1, 1, 64, 0), Setting(1, 1, 1, 32, 0)
    rates = {start: [100, 100, 100, 100], challenger: [200, 300, 95, 95]}

    def measure(setting: Setting, round_: int, _bar: object) -> Trial:
        result = PointResult(rates[setting][round_], 100, 1.0, 10.0, {}, 1.0)
        return Trial(setting, round_, MEASURED, {POINT.label: result})

    only_batch = Space((1,), (1,), (1,), (32, 64), (0,), cpus=2)
    outcome = Search(
        only_batch, start, 100.0, 0.05, 2, measure, lambda _s: 1.0, Budget(1e6, 0.0)
    ).run()
    assert outcome.evaluations[challenger].points[POINT.label].images_per_s == 147.5
    assert outcome.chosen == start and outcome.final_rounds == 3
    rates[challenger] = [200, 300, 95, 105]  # now it wins two rounds of three
    outcome = Search(
        only_batch, start, 100.0, 0.05, 2, measure, lambda _s: 1.0, Budget(1e6, 0.0)
    ).run()
    assert outcome.chosen == challenger and outcome.paired_wins == (2, 3)


def test_search_stays_within_its_budget() -> None:
    machine = Machine()
    outcome = search(machine, seconds=4.5).run()
    # A measurement takes (and is estimated at) 1 s: the start, then 3 more fit in 4.5 s.
    assert outcome.stopped_by_budget and len(machine.measured) == 4


def test_a_measurement_stops_early_only_when_it_cannot_win() -> None:
    def result(images_per_s: float, p99_ms: float = 10.0) -> PointResult:
        return PointResult(images_per_s, 100, 1.0, p99_ms, {}, 1.0)

    bar = Evaluation(Setting(1, 1, 1, 64, 0), MEASURED, {"a": result(1000), "b": result(1000)}, 1)
    assert early_stop({"a": result(200)}, bar, 100.0) is None  # one point: maybe disturbed
    assert early_stop({"a": result(200), "b": result(2000)}, bar, 100.0) is None  # 0.63x
    assert "0.35x" in (early_stop({"a": result(200), "b": result(600)}, bar, 100.0) or "")
    assert "over the budget" in (early_stop({"a": result(2000, p99_ms=150)}, bar, 100.0) or "")
    errors = PointResult(1000, 100, 1.0, 10.0, {"UNAVAILABLE": 3}, 1.0)
    assert "errors" in (early_stop({"a": errors}, bar, 100.0) or "")
    # Against a bar over the budget itself, every setting is measured whole.
    assert early_stop({"a": result(200), "b": result(200)}, bar, 5.0) is None
    assert early_stop({"a": result(200), "b": result(200)}, None, 100.0) is None


def test_finals_halve_the_challengers_each_round() -> None:
    assert [finals_measurements(n) for n in (1, 2, 3, 4, 5)] == [0, 6, 7, 9, 10]


def test_default_space_follows_the_machine() -> None:
    assert powers_of_two(6) == (1, 2, 4, 6) and powers_of_two(1) == (1,)
    small = default_space(2, threads_searched=True)
    assert small.workers == (1, 2) and small.instances == (1, 2) and small.threads == (1, 2)
    big = default_space(64, threads_searched=False)
    assert big.workers[-1] == 64 and big.instances == (1, 2, 4) and big.threads == ()
    assert not small.allowed(Setting(2, 2, 2, 64, 0))  # 8 threads on 2 CPUs
