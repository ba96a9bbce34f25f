"""The benchmark tool end to end against real server subprocesses, and the null-compute server.

Structure and sanity only (keys, positive throughputs, ordered percentiles, ratios that follow
from the figures): speed is never asserted, it is what the tool reports.
"""

from __future__ import annotations

import asyncio
import collections
import json
import operator
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from server_process import PROJECT_ROOT, ServerProcess, copy_repository, set_batching

from benchmarks.ceiling import measure_ceiling, server_settings
from benchmarks.clients import LATE_TOLERANCE_S, ClientPool, Job, split_load
from benchmarks.common import BenchError, Config, Sample
from benchmarks.measure import Timing, send_times
from benchmarks.results import format_steps, late_warning, step_from
from benchmarks.rounds import median, medians_by, paired_ratios, ratios_of
from modelrepo.layout import INPUT_NAME, ONNX_FILE, OUTPUT_NAME
from server.app import NULL_COMPUTE_WARNING
from server.config import parse_settings
from server.core.batcher import Batcher
from server.observability.metrics import Metrics
from server.runtimes.null import NullRuntime

MODEL = "fashion_mnist"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server(model_repository: Path) -> Iterator[ServerProcess]:
    with ServerProcess(model_repository, "--models", MODEL) as process:
        yield process


# --- the suite: python -m benchmarks ---------------------------------------------------------


def test_short_run_measures_served_path_against_both_ceilings(
    model_repository: Path, tmp_path: Path
) -> None:
    """Compute ceiling, transport ceiling and served sweeps, two client processes, one rate."""
    repo = copy_repository(model_repository, tmp_path / "repo", [MODEL])
    out = tmp_path / "results"
    done = run_benchmarks(
        "--short", "--model-repository", str(repo), "--model", MODEL,
        "--client-processes", "2", "--concurrency", "1", "4", "--batch-images", "4",
        "--rates", "50", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert set(report) >= {"created", "machine", "settings", "compute_ceiling", "steps", "ratios"}
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert report["settings"]["client_processes"] == 2 and report["settings"]["seed"] == 0

    ceiling = report["compute_ceiling"]
    assert [p["batch_size"] for p in ceiling][:2] == [1, 2]
    assert all(p["images_per_s"] > 0 and p["batch_ms"] > 0 for p in ceiling)
    assert all(p["instances"] == 1 for p in ceiling)  # the model's instance_group count

    steps = report["steps"]
    closed = [s for s in steps if s["mode"] == "closed"]
    kinds = {(s["server"], s["concurrency"], s["images_per_request"]) for s in closed}
    assert kinds == {(k, c, i) for k in ("served", "transport") for c in (1, 4) for i in (1, 4)}
    (open_step,) = [s for s in steps if s["mode"] == "open"]
    assert open_step["server"] == "served" and open_step["offered_rate"] == 50
    for step in steps:
        assert step["requests"] > 0 and step["errors"] == {}
        assert step["images_per_s"] == pytest.approx(
            step["requests_per_s"] * step["images_per_request"], rel=0.01
        )
        lat = step["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert step["server_cpu_cores"] > 0 and step["client_cpu_cores"] > 0
        assert step["server_cpu_ms_per_request"] == pytest.approx(
            1000 * step["server_cpu_cores"] / step["requests_per_s"], rel=2e-2
        )
        # Batches hold whole requests: at least one request's images, at most max_batch_size.
        assert step["images_per_request"] <= step["mean_batch_size"] <= 64
        # Every client process began its load together, after all of them were ready.
        assert len(step["client_start_late_s"]) == len(step["client_shares"])
        assert step["late_clients"] == [
            i for i, late in enumerate(step["client_start_late_s"]) if late > LATE_TOLERANCE_S
        ]
    for step in closed:
        # The in-flight count the step is labelled with is the one the clients really held:
        # concurrency 1 over two processes is one process with one worker, not two.
        assert sum(step["client_shares"]) == step["concurrency"]
        assert len(step["client_shares"]) == min(2, step["concurrency"])
        assert step["peak_in_flight"] == step["concurrency"]
        if step["concurrency"] == 1:  # one request at a time: every batch is that request
            assert step["mean_batch_size"] == step["images_per_request"]
    assert open_step["client_shares"] == [25.0, 25.0]

    by_key = {(s["server"], s["concurrency"], s["images_per_request"]): s for s in closed}
    vs_transport = report["ratios"]["served_vs_transport"]
    assert len(vs_transport) == 4
    for r in vs_transport:
        served = by_key["served", r["concurrency"], r["images_per_request"]]
        null = by_key["transport", r["concurrency"], r["images_per_request"]]
        assert r["ratio"] == pytest.approx(served["images_per_s"] / null["images_per_s"], abs=2e-4)
        cpu = null["server_cpu_ms_per_request"] / served["server_cpu_ms_per_request"]
        assert r["cpu_per_request_ratio"] == pytest.approx(cpu, rel=1e-2)
    vs_compute = report["ratios"]["served_vs_compute"]
    assert len(vs_compute) == 4
    sizes = [p["batch_size"] for p in ceiling]
    for r in vs_compute:
        served = by_key["served", r["concurrency"], r["images_per_request"]]
        assert r["mean_batch_size"] == served["mean_batch_size"]
        expected = np.interp(
            np.log2(r["mean_batch_size"]), np.log2(sizes), [p["images_per_s"] for p in ceiling]
        )
        assert r["ceiling_images_per_s"] == pytest.approx(expected, rel=1e-3)
        assert r["ratio"] == pytest.approx(served["images_per_s"] / expected, rel=1e-2, abs=1e-4)

    for name in ("throughput.png", "latency.png", "open_loop.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert "P99 MS" in done.stdout and "served / transport ceiling" in done.stdout
    assert "client process" in done.stderr  # progress lines while it runs


def test_external_target_has_no_server_cpu(server: ServerProcess, tmp_path: Path) -> None:
    """--target: only the served sweep, over the KServe v2 protocol; server CPU is n/a."""
    out = tmp_path / "results"
    done = run_benchmarks(
        "--short", "--target", server.target, "--model", MODEL, "--concurrency", "2",
        "--batch-images", "1", "--rates", "--metrics-url", server.metrics_url,
        "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    (step,) = report["steps"]
    assert (step["server"], step["mode"], step["concurrency"]) == ("served", "closed", 2)
    assert step["requests"] > 0
    assert step["server_cpu_cores"] is None and step["server_cpu_ms_per_request"] is None
    assert step["mean_batch_size"] >= 1
    assert report["compute_ceiling"] == [] and report["ratios"]["served_vs_transport"] == []
    assert " n/a " in done.stdout


# --- how a load is shared by client processes ------------------------------------------------

TIMING = Timing(warmup_s=0.0, duration_s=0.3, timeout_s=5.0)


@pytest.mark.parametrize(("concurrency", "processes"), [(1, 2), (3, 2), (4, 8), (32, 4)])
def test_closed_loop_shares_hold_the_concurrency(concurrency: int, processes: int) -> None:
    config = Config("x", concurrency=concurrency)
    jobs = split_load("127.0.0.1:1", config, TIMING, processes)
    shares = [job.config.concurrency for job in jobs]
    assert sum(shares) == concurrency and min(shares) >= 1  # no process gets an idle worker
    assert len(jobs) == min(concurrency, processes) and max(shares) - min(shares) <= 1


def test_open_loop_processes_draw_their_own_arrivals() -> None:
    """Two processes at 500/s each: together Poisson at 1000/s, not the same times twice."""
    jobs = split_load("127.0.0.1:1", Config("x"), TIMING, 2, rate=1000.0, run_seed=7)
    assert [job.rate for job in jobs] == [500.0, 500.0]
    schedules = [list(send_times(0.0, 20.0, job.rate or 0.0, job.seed)) for job in jobs]
    merged = sorted(schedules[0] + schedules[1])
    assert len(set(merged)) == len(merged)  # no send time shared by both processes
    assert len(merged) == pytest.approx(20_000, rel=0.05)  # 1000/s over 20 s (sd 0.7 %)
    gaps = np.diff(merged)
    # Exponential gaps at the total rate: mean 1 ms and as spread as their mean (cv 1).
    assert gaps.mean() == pytest.approx(1e-3, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)
    other = split_load("127.0.0.1:1", Config("x"), TIMING, 2, rate=1000.0, run_seed=8)
    assert list(send_times(0.0, 20.0, 500.0, other[0].seed))[:10] != schedules[0][:10]


def test_a_late_client_is_flagged_in_the_json_and_the_table() -> None:
    jobs = split_load("127.0.0.1:1", Config("x", concurrency=2), TIMING, 2)
    sample = Sample([0.001] * 10, collections.Counter(), 1.0, 0.1, 0.2, 2, (0.001, 0.4))
    step = step_from("served", jobs, 1, sample, 1.0)
    assert step.late_clients == [1] and step.client_start_late_s == [0.001, 0.4]
    assert step.client_shares == [1, 1] and step.concurrency == 2
    assert format_steps([step]).splitlines()[1].split()[-1] == "1!"
    assert "0.400 s" in (late_warning([step]) or "")
    on_time = step_from("served", jobs, 1, replace(sample, start_late_s=(0.001, 0.002)), 1.0)
    assert on_time.late_clients == [] and late_warning([on_time]) is None


# --- rounds: medians and paired ratios -------------------------------------------------------


def test_paired_ratios_cancel_the_drift_that_moves_a_whole_round() -> None:
    """Each round the machine is busier or calmer, moving both servers alike: the medians move
    with it, the ratio within each round does not."""
    run = collections.namedtuple("run", "kind requests_per_s")
    rounds = [[run("off", 100 * f), run("on", 90 * f)] for f in (1.0, 0.5, 0.75)]
    kind, figures = operator.attrgetter("kind"), ["requests_per_s"]
    assert medians_by([r for one in rounds for r in one], kind, figures) == {
        "off": {"requests_per_s": 75.0, "rounds": 3},
        "on": {"requests_per_s": 67.5, "rounds": 3},
    }
    assert paired_ratios(rounds, kind, "off", figures) == {
        "off": {"requests_per_s": 1.0},
        "on": {"requests_per_s": 0.9},
    }
    assert median([None, 3.0, 1.0, None], 3) == 2.0 and median([None]) is None
    assert ratios_of({"a": (3.0, 2.0), "b": (None, 2.0), "c": (1.0, 0.0)}) == {"a": 1.5}


def test_client_pool_starts_only_once_every_process_is_ready(server: ServerProcess) -> None:
    """A process that cannot get ready fails the step before anything is measured; the
    ready ones are stopped, not left waiting, so the pool runs the next step."""
    config = Config("x", api="kserve", model=MODEL, concurrency=1)
    broken = [
        Job(server.target, config, TIMING),
        Job(server.target, replace(config, model="no_such_model"), TIMING),
    ]
    with ClientPool(2) as pool:
        with pytest.raises(BenchError, match="no model 'no_such_model'"):
            pool.start(broken)
        jobs = split_load(server.target, replace(config, concurrency=4), TIMING, 2)
        pool.start(jobs)
        samples = pool.collect(30.0)
    assert [s.peak_in_flight for s in samples] == [2, 2]
    assert all(s.latencies_s and not s.errors for s in samples)
    assert all(len(s.start_late_s) == 1 for s in samples)


def test_compute_ceiling_runs_every_instance(model_repository: Path, tmp_path: Path) -> None:
    repo = copy_repository(model_repository, tmp_path / "repo", [MODEL])
    set_batching(repo / MODEL, instances=2, max_batch_size=4)
    points = measure_ceiling(repo, MODEL, server_settings(repo, []), 0.05)
    assert [p.batch_size for p in points] == [1, 2, 4]
    assert all(p.instances == 2 and p.images_per_s > 0 and p.batch_ms > 0 for p in points)


def test_needs_a_repository_or_a_target() -> None:
    done = run_benchmarks("--short", timeout=30)
    assert done.returncode == 2
    assert "--model-repository" in done.stderr and "--target" in done.stderr


# --- the null-compute server -----------------------------------------------------------------


def test_null_compute_answers_uniform_probabilities_through_the_batcher(
    model_repository: Path,
) -> None:
    with ServerProcess(model_repository, "--models", MODEL, "--null-compute") as process:
        assert NULL_COMPUTE_WARNING in process.log
        with triton.InferenceServerClient(process.target) as client:
            images = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
            tensor = triton.InferInput(INPUT_NAME, list(images.shape), "FP32")
            tensor.set_data_from_numpy(images)
            result = client.infer(
                MODEL, [tensor], outputs=[triton.InferRequestedOutput(OUTPUT_NAME)]
            )
            probabilities = result.as_numpy(OUTPUT_NAME)
        assert probabilities.shape == (3, 10) and probabilities.dtype == np.float32
        np.testing.assert_allclose(probabilities, 0.1)
        assert process.metric("imgserve_batch_size_count", model=MODEL, version="1") >= 1
        assert process.metric("imgserve_batch_size_sum", model=MODEL, version="1") >= 3


def test_null_compute_is_a_boolean_setting(tmp_path: Path) -> None:
    assert parse_settings(["--model-repository", str(tmp_path)], env={}).null_compute is False
    assert parse_settings(
        ["--model-repository", str(tmp_path), "--null-compute"], env={}
    ).null_compute
    env = {"SERVER_NULL_COMPUTE": "1"}
    assert parse_settings(["--model-repository", str(tmp_path)], env=env).null_compute


# --- the adaptive batch delay (an optimisation the benchmarks measured) -------------------------


def test_adaptive_delay_runs_a_lone_request_at_once_and_still_batches_under_load() -> None:
    """A 30 s delay: a lone request is not held for it, concurrent requests still share a batch
    (and once several did, the next lone request waits for companions again)."""

    def image() -> dict[str, np.ndarray]:
        return {"input": np.zeros((1, 1, 28, 28), np.float32)}

    async def scenario() -> tuple[float, list[int], bool]:
        metrics = Metrics()
        batcher = Batcher(
            [NullRuntime({"probabilities": ((10,), np.dtype(np.float32))})],
            model=MODEL, version=1, max_batch_size=4,
            max_queue_delay_s=30.0, max_queue_size=16, metrics=metrics, adaptive_delay=True,
        )  # fmt: skip
        batcher.start()
        began = time.monotonic()
        await batcher.submit(image())
        lone = time.monotonic() - began
        await asyncio.sleep(0)
        # Four arrive together: the worker wakes on the first and finds them all queued.
        answers = await asyncio.gather(*(batcher.submit(image()) for _ in range(4)))
        batches = metrics.registry.get_sample_value(
            "imgserve_batch_size_count", {"model": MODEL, "version": "1"}
        )
        later = asyncio.ensure_future(batcher.submit(image()))
        await asyncio.sleep(0.2)
        held = not later.done()  # the last batch held 4 requests: it waits for companions
        await batcher.close()  # flushes it
        await later
        rows = [len(a["probabilities"]) for a in answers]
        return lone, [*rows, int(batches or 0)], held

    lone, sizes, held = asyncio.run(scenario())
    assert lone < 10.0  # not the 30 s delay
    assert sizes == [1, 1, 1, 1, 2]  # every caller its row; the four in one batch (2 in all)
    assert held


# --- compare: the side-by-side load generator ---------------------------------------------


def run_bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m benchmarks compare ...`, as users run it."""
    return run_benchmarks("compare", *args, timeout=timeout)


def run_benchmarks(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_bench_short_run(server: ServerProcess, tmp_path: Path) -> None:
    """About two seconds: one second on each API, side by side, with ratios to the first."""
    out = tmp_path / "bench.json"
    done = run_bench(
        "--server", server.target, "--model", MODEL, "--concurrency", "4",
        "--duration", "1", "--warmup", "0.2", "--out", str(out),
        "--compare", "native=--api native", "kserve=--api kserve",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    native, kserve = report["results"]
    assert (native["config"]["api"], kserve["config"]["api"]) == ("native", "kserve")
    for result in (native, kserve):
        assert result["requests"] > 0
        assert result["errors"] == {}
        assert result["requests_per_s"] == pytest.approx(result["requests"] / 1.0, rel=0.01)
        assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
    assert native["ratios"]["requests_per_s"] == 1.0
    assert kserve["ratios"]["requests_per_s"] == pytest.approx(
        kserve["requests_per_s"] / native["requests_per_s"], rel=0.01
    )
    assert "REQ/S" in done.stdout and "kserve" in done.stdout


def test_bench_stream_modes(server: ServerProcess, tmp_path: Path) -> None:
    """About two seconds: each stream API carries its requests over two streams, all answered."""
    out = tmp_path / "bench.json"
    done = run_bench(
        "--server", server.target, "--model", MODEL, "--concurrency", "4", "--streams", "2",
        "--duration", "1", "--warmup", "0.2", "--out", str(out),
        "--compare", "native=--api native-stream", "kserve=--api kserve-stream",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())["results"]
    assert [r["config"]["api"] for r in results] == ["native-stream", "kserve-stream"]
    for result in results:
        assert result["config"]["streams"] == 2
        assert result["requests"] > 0
        assert result["errors"] == {}
        assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]


def test_bench_starts_its_own_server(model_repository: Path, tmp_path: Path) -> None:
    """--model-repository: a server per configuration, measured from outside, then stopped."""
    repo = copy_repository(model_repository, tmp_path / "repo", [MODEL])
    out = tmp_path / "bench.json"
    done = run_bench(
        "--model-repository", str(repo), "--model", MODEL, "--concurrency", "2",
        "--duration", "0.5", "--warmup", "0.1", "--out", str(out),
        "--compare", "one=--intra-op-threads 1", "k=--api kserve",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["target"] == f"started server on {repo}"
    one, kserve = report["results"]
    assert one["config"]["server_args"] == ["--intra-op-threads", "1"]
    assert kserve["config"]["api"] == "kserve"
    for result in (one, kserve):
        assert result["requests"] > 0 and result["errors"] == {}
        assert result["server_cpu_cores"] is not None and result["server_cpu_cores"] > 0
        assert result["server_cpu_ms_per_request"] == pytest.approx(
            1000 * result["server_cpu_cores"] / result["requests_per_s"], rel=2e-2
        )
    assert report["machine"]["cores"] >= 1 and report["rounds"] == 1


@pytest.mark.parametrize("case", ["server exits", "model not ready"])
def test_bench_fails_at_once_when_its_server_cannot_serve(
    case: str, model_repository: Path, tmp_path: Path
) -> None:
    """No waiting out the start-up timeout (minutes): the cause comes back in seconds."""
    repo = copy_repository(model_repository, tmp_path / "repo", [MODEL])
    flags = ["--model-repository", str(repo), "--duration", "0.5", "--warmup", "0"]
    if case == "server exits":
        flags.append("--server-args=--no-such-flag")
        expected = ["exited with status 2 before it was ready", "--no-such-flag"]
    else:
        (repo / MODEL / "1" / ONNX_FILE).write_bytes(b"not an onnx model")
        expected = [f"model '{MODEL}' is not ready after start-up", "UNAVAILABLE"]
    began = time.monotonic()
    done = run_bench(*flags)
    elapsed = time.monotonic() - began

    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert elapsed < 30, f"took {elapsed:.1f} s"
    for text in expected:
        assert text in done.stderr
    if case == "server exits":  # the server's own last words are shown
        assert "unrecognized arguments" in done.stderr


def test_bench_rejects_an_invalid_address() -> None:
    done = run_bench("--server", "bad::addr::", "--duration", "0.5", timeout=30)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "error: invalid server address 'bad::addr::': not a valid host name"
    )


# --- the worker sweep: python -m benchmarks workers ------------------------------------------


def test_workers_sweep_measures_served_and_do_nothing_servers(
    model_repository: Path, tmp_path: Path
) -> None:
    """One short round of 1 and 2 workers, with h2load, beside the do-nothing server."""
    from deploy_tools import tool

    tool("h2load")
    repo = copy_repository(model_repository, tmp_path / "repo", [MODEL])
    out = tmp_path / "workers"
    done = run_benchmarks(
        "workers", "--model-repository", str(repo), "--model", MODEL, "--workers", "1,2",
        "--duration", "1", "--warmup", "0.5", "--rounds", "1", "--connections", "4",
        "--streams", "2", "--lone-calls", "20", "--out", str(out),
        timeout=420,  # five servers to start on a busy machine
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    medians = {(m["server"], m["workers"]): m for m in results["medians"]}
    assert set(medians) == {
        ("served", 1), ("served", 2), ("served, 1 conn", 2), ("do-nothing", 1), ("do-nothing", 2),
    }  # fmt: skip
    for figures in medians.values():
        assert figures["requests_per_s"] > 0 and figures["cpu_ms_per_request"] > 0
    # Server CPU counts the workers, not an idle supervisor.
    assert medians[("served", 2)]["cpu_cores"] > 0.2
    lone = results["concurrency_1"]
    assert set(lone) == {"served", "do-nothing"}
    # Where a lone request's time goes inside the served server: its stages add up to no
    # more than its whole time there (the rest is the hops between them).
    inside = lone["served"]["inside_us"]
    stages = [
        inside[stage] for stage in ("queue", "compute_input", "compute_infer", "compute_output")
    ]
    assert inside["compute_infer"] > 0 and 0 < sum(stages) <= inside["success"]
    assert "inside_us" not in lone["do-nothing"]
    assert "inside the server" in done.stdout
    assert (out / "workers.png").read_bytes().startswith(PNG_MAGIC)
    assert "vs do-nothing" in done.stdout


def test_workers_sweep_on_both_transports(model_repository: Path, tmp_path: Path) -> None:
    """Each server, served and do-nothing, on grpcio and on native in the same rounds."""
    from deploy_tools import tool

    tool("h2load")
    repo = copy_repository(model_repository, tmp_path / "repo", [MODEL])
    out = tmp_path / "workers"
    done = run_benchmarks(
        "workers", "--model-repository", str(repo), "--model", MODEL, "--workers", "1",
        "--transport", "grpcio,native", "--duration", "1", "--warmup", "0.5", "--rounds", "1",
        "--connections", "4", "--streams", "2", "--lone-calls", "10", "--out", str(out),
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["transports"] == ["grpcio", "native"]
    servers = {m["server"] for m in results["medians"]}
    assert servers == {
        "grpcio: served", "grpcio: do-nothing", "native: served", "native: do-nothing"
    }  # fmt: skip
    assert set(results["concurrency_1"]) == servers
    assert "vs grpcio" in done.stdout
    assert "native: served p50 is" in done.stdout


def test_workers_sweep_needs_a_repository() -> None:
    done = run_benchmarks("workers", "--model", MODEL)
    assert done.returncode == 2 and "--model-repository" in done.stderr


def test_models_benchmark_measures_any_model_beside_another_checkout(
    model_repository: Path, tmp_path: Path
) -> None:
    """The seed model and a two-input INT32 model, served by this checkout and by a second
    server of the same checkout given as --before: both measured, ratios paired per model."""
    from deploy_tools import tool
    from triton_models import write_simple

    tool("h2load")
    repo = copy_repository(model_repository, tmp_path / "repo", [MODEL])
    write_simple(repo)
    out = tmp_path / "models"
    done = run_benchmarks(
        "models", "--model-repository", str(repo), "--models", f"{MODEL},simple",
        "--before", str(PROJECT_ROOT), "--duration", "1", "--warmup", "0.5", "--rounds", "1",
        "--connections", "2", "--streams", "2", "--out", str(out),
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["medians"]) == {
        f"this/{MODEL}",
        "this/simple",
        f"before/{MODEL}",
        "before/simple",
    }
    for figures in results["medians"].values():
        assert figures["requests_per_s"] > 0 and figures["cpu_ms_per_request"] > 0
    assert set(results["this_over_before"]) == {MODEL, "simple"}
    assert "this checkout / before" in done.stdout


def test_tracing_overhead_run_serves_off_and_sampled_side_by_side(
    model_repository: Path, tmp_path: Path
) -> None:
    """`python -m benchmarks tracing`: off, 1% and 100% sampled servers, the sampled ones
    sending their spans to the tool's receiver (spans per request tell the sampling apart)."""
    if shutil.which("h2load") is None:
        pytest.skip("h2load not installed (Debian: nghttp2-client)")
    repo = copy_repository(model_repository, tmp_path / "repo", [MODEL])
    out = tmp_path / "tracing"
    done = run_benchmarks(
        "tracing", "--model-repository", str(repo), "--model", MODEL, "--rounds", "1",
        "--duration", "1", "--warmup", "1", "--connections", "2", "--streams", "2",
        "--out", str(out), timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "results.json").read_text())
    assert [s["label"] for s in report["setups"]] == ["off", "1%", "100%"]
    assert set(report["medians"]) == {"off", "1%", "100%"}
    for figures in report["medians"].values():
        assert figures["requests_per_s"] > 0 and figures["cpu_ms_per_request"] > 0
    assert report["paired_ratios_to_off"]["off"] == {"requests_per_s": 1, "cpu_ms_per_request": 1}
    spans = report["spans_per_request"]
    assert spans["100%"] >= 5  # request, decode, queue, compute, encode (+ shared batches)
    assert spans["1%"] < 1
    assert "req/s vs off" in done.stdout
