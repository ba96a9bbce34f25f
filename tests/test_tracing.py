"""OpenTelemetry tracing against a real OTLP/gRPC receiver, with one worker and with two.

Each test's client starts traces of its own (a W3C `traceparent` in the call's metadata, as an
instrumented client sends it) and finds the server's spans in what the receiver got: one
trace, the server's span parented on the caller's, the stage spans under it, the batch's span
linked both ways. Exemplars are read from the real /metrics in OpenMetrics, and a real
Prometheus with exemplar storage must hand them back as Grafana asks for them.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from deploy_tools import dashboard_expressions, dashboard_panels, tool
from otlp_receiver import INTERNAL, SERVER, OtlpReceiver, Span
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from server_process import (
    ServerProcess,
    classifier_method,
    clone_model,
    kserve_method,
    set_batching,
)
from test_deploy_live import Prometheus

from server.api.status import REQUEST_ID_KEY, WORKER_KEY
from server.config import parse_settings
from server.observability.tracing_config import TracingConfigError, config_from, parse_attributes
from wire import classifier_pb2
from wire import grpc_service_pb2 as pb

pytestmark = pytest.mark.both_transports
MODEL = "fashion_mnist"
# A copy of MODEL that waits for companions (max_queue_delay), so concurrent calls share a batch.
BATCHED = "fashion_batched"
BATCH_DELAY_US = 300_000
SHAPE = (1, 28, 28)
REQUEST_METRIC = "imgserve_request_duration_seconds"
QUEUE_METRIC = "imgserve_queue_duration_seconds"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
# Channels opened to reach every worker (see tests/test_workers.py).
CHANNELS = 16
# Every OTEL_* variable the server reads, blank (unset, to OpenTelemetry): the tests' own
# environment must not turn tracing on or change it.
BLANK_OTEL = {
    name: ""
    for name in (
        "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED", "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_SAMPLER_ARG", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES",
        "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_PROPAGATORS",
    )
}  # fmt: skip


def on_env(receiver: OtlpReceiver, **more: str) -> dict[str, str]:
    """The standard variables alone turn tracing on; spans leave every 100 ms."""
    return {
        **BLANK_OTEL,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        **more,
    }


class Caller:
    """A client that starts a trace per call, as an instrumented application does."""

    def __init__(self, sampled: bool = True) -> None:
        self.trace_id = secrets.token_hex(16)
        self.span_id = secrets.token_hex(8)  # the caller's own (client) span
        self.request_id = "req-" + secrets.token_hex(6)
        self.sampled = sampled

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        flags = "01" if self.sampled else "00"
        return (
            ("traceparent", f"00-{self.trace_id}-{self.span_id}-{flags}"),
            ("tracestate", "vendor=imgserve-test"),
            (REQUEST_ID_KEY, self.request_id),
        )


def infer_request(images: np.ndarray, model: str = MODEL) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=list(images.shape))
    request.raw_input_contents.append(images.astype(np.float32).tobytes())
    return request


def images(n: int = 1, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(n).random((n, *shape), np.float32)


def infer(channel: grpc.Channel, caller: Caller, request: pb.ModelInferRequest) -> int | None:
    """One ModelInfer call in `caller`'s trace; the worker that answered (None: one worker)."""
    _, call = kserve_method(channel, "ModelInfer").with_call(
        request, metadata=caller.metadata, timeout=30
    )
    worker = dict(call.trailing_metadata()).get(WORKER_KEY)
    return None if worker is None else int(worker)


def own_channel(target: str) -> grpc.Channel:
    """A channel with its own connection: the kernel may give it to any worker."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def spans_of(receiver: OtlpReceiver, caller: Caller, count: int) -> list[Span]:
    """The spans in `caller`'s trace, once `count` of them arrived."""
    receiver.wait_for(
        lambda spans: sum(s.trace_id == caller.trace_id for s in spans) >= count,
        f"{count} spans in trace {caller.trace_id}",
    )
    return receiver.spans(caller.trace_id)


def request_span(spans: list[Span]) -> Span:
    (server_span,) = [s for s in spans if s.kind == SERVER]
    return server_span


def children(spans: list[Span], parent: Span) -> dict[str, list[Span]]:
    found: dict[str, list[Span]] = {}
    for span in spans:
        if span.parent_span_id == parent.span_id:
            found.setdefault(span.name, []).append(span)
    return found


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    instance = OtlpReceiver()
    yield instance
    instance.stop()


def _with_batched_copy(repository: Path) -> None:
    clone_model(repository / MODEL, repository, BATCHED)
    set_batching(repository / BATCHED, max_queue_delay_us=BATCH_DELAY_US)


@pytest.fixture(scope="module", params=[1, 2], ids=["1-worker", "2-workers"])
def server(
    request: pytest.FixtureRequest,
    serve: Callable[..., ServerProcess],
    receiver: OtlpReceiver,
) -> ServerProcess:
    return serve(
        "--workers", str(request.param), "--log-format", "json", "--log-level", "debug",
        models=[MODEL], prepare=_with_batched_copy, env=on_env(receiver),
    )  # fmt: skip


def workers_of(server: ServerProcess) -> int:
    return int(server.command[server.command.index("--workers") + 1])


def test_the_request_span_joins_the_callers_trace_with_its_stages(
    server: ServerProcess, receiver: OtlpReceiver
) -> None:
    caller = Caller()
    with own_channel(server.target) as channel:
        infer(channel, caller, infer_request(images(3)))
    spans = spans_of(receiver, caller, 5)  # request, decode, queue, compute, encode
    assert {s.trace_id for s in spans} == {caller.trace_id}  # one trace: the caller's
    request = request_span(spans)
    assert request.name == "inference.GRPCInferenceService/ModelInfer"
    assert request.parent_span_id == caller.span_id
    attributes = request.attributes
    assert attributes["imgserve.request_id"] == caller.request_id
    assert attributes["imgserve.model.name"] == MODEL
    assert attributes["imgserve.model.version"] == "1"
    assert attributes["imgserve.images"] == 3
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == "inference.GRPCInferenceService"
    assert attributes["rpc.method"] == "ModelInfer"
    assert attributes["rpc.grpc.status_code"] == 0
    assert not request.is_error
    stages = children(spans, request)
    assert sorted(stages) == ["compute", "decode", "encode", "queue"]
    (decode,), (queue,), (compute,), (encode,) = (
        stages[name] for name in ("decode", "queue", "compute", "encode")
    )
    # In order, inside the request's span (a few microseconds of clock conversion allowed).
    slack = 50_000
    assert request.start_ns <= decode.start_ns <= decode.end_ns <= queue.start_ns + slack
    assert queue.end_ns <= compute.start_ns + slack
    assert compute.end_ns <= encode.start_ns + slack
    assert encode.end_ns <= request.end_ns
    assert queue.attributes["imgserve.images"] == 3
    assert compute.attributes["imgserve.batch.size"] == 3
    assert compute.attributes["imgserve.model.version"] == "1"


def test_an_http_request_joins_the_callers_trace_from_its_headers(
    server: ServerProcess, receiver: OtlpReceiver
) -> None:
    """The same span over HTTP/REST: traceparent and tracestate come as headers."""
    caller = Caller()
    pixels = images(2)
    body = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(pixels.shape),
                     "data": pixels.ravel().tolist()}]}
    ).encode()  # fmt: skip
    request = urllib.request.Request(
        f"{server.http_url}/v2/models/{MODEL}/infer",
        data=body,
        headers={"Content-Type": "application/json", **dict(caller.metadata)},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    spans = spans_of(receiver, caller, 5)
    span = request_span(spans)
    assert span.name == f"POST /v2/models/{MODEL}/infer"
    assert span.parent_span_id == caller.span_id
    assert span.attributes["imgserve.request_id"] == caller.request_id
    assert span.attributes["imgserve.images"] == 2
    assert sorted(children(spans, span)) == ["compute", "decode", "encode", "queue"]


def test_the_batch_span_is_linked_from_every_request_that_rode_in_it(
    server: ServerProcess, receiver: OtlpReceiver
) -> None:
    callers = [Caller() for _ in range(4)]
    sizes = [1, 2, 3, 4]
    with own_channel(server.target) as channel, ThreadPoolExecutor(len(callers)) as pool:
        # One channel, so one worker; the model waits BATCH_DELAY_US for companions.
        list(
            pool.map(
                lambda c, n: infer(channel, c, infer_request(images(n), BATCHED)),
                callers,
                sizes,
            )
        )
    requests = {}
    batches: dict[str, Span] = {}
    for caller in callers:
        spans = spans_of(receiver, caller, 5)
        request = request_span(spans)
        requests[caller.trace_id] = request
        (compute,) = children(spans, request)["compute"]
        (link,) = compute.links
        batch_spans = receiver.wait_for(
            lambda got, link=link: any(s.span_id == link.span_id for s in got), "the batch span"
        )
        (batch,) = [s for s in batch_spans if s.span_id == link.span_id]
        batches[batch.span_id] = batch
        assert batch.trace_id not in {c.trace_id for c in callers}  # a trace of its own
        assert compute.attributes["imgserve.batch.size"] == batch.attributes["imgserve.batch.size"]
    assert len(batches) == 1, "the concurrent calls were meant to share one batch"
    (batch,) = batches.values()
    assert batch.name == "batch" and batch.kind == INTERNAL and not batch.parent_span_id
    assert batch.attributes["imgserve.model.name"] == BATCHED
    assert batch.attributes["imgserve.model.version"] == "1"
    assert batch.attributes["imgserve.batch.size"] == sum(sizes)
    assert batch.attributes["imgserve.batch.requests"] == len(callers)
    linked = {(link.trace_id, link.span_id) for link in batch.links}
    assert linked == {(r.trace_id, r.span_id) for r in requests.values()}


def test_every_worker_exports_its_own_spans(server: ServerProcess, receiver: OtlpReceiver) -> None:
    answered: dict[str, int | None] = {}
    for _ in range(CHANNELS):
        caller = Caller()
        with own_channel(server.target) as channel:
            answered[caller.trace_id] = infer(channel, caller, infer_request(images()))
    receiver.wait_for(
        lambda got: {s.trace_id for s in got if s.kind == SERVER} >= set(answered),
        "every request's span",
    )
    pids: dict[int | None, set[int]] = {}
    for trace_id, worker in answered.items():
        resource = request_span(receiver.spans(trace_id)).resource
        assert resource["service.name"] == "imgserve"
        assert resource.get("imgserve.worker.index") == worker
        pids.setdefault(worker, set()).add(resource["process.pid"])
    expected = list(range(workers_of(server))) if workers_of(server) > 1 else [None]
    assert sorted(pids, key=str) == expected, f"spans by worker: {pids}"
    assert all(len(p) == 1 for p in pids.values())  # one provider per worker process
    assert len(set().union(*pids.values())) == len(expected)


def test_errors_are_recorded_with_their_status_code(
    server: ServerProcess, receiver: OtlpReceiver
) -> None:
    wrong, unknown = Caller(), Caller()
    with own_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            infer(channel, wrong, infer_request(images(1, (1, 27, 27))))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as missing:
            infer(channel, unknown, infer_request(images(), "no_such_model"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    request = request_span(spans_of(receiver, wrong, 2))
    assert request.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert request.attributes["error.type"] == "INVALID_ARGUMENT"
    assert request.attributes["imgserve.model.name"] == MODEL
    (exception,) = [attrs for name, attrs in request.events if name == "exception"]
    assert "27" in exception["exception.message"]  # what the caller was told
    assert not request.is_error  # the caller's mistake, not the server's (OTel's gRPC rules)
    (decode,) = children(receiver.spans(wrong.trace_id), request)["decode"]
    assert decode.is_error  # the stage it failed in
    lost = request_span(spans_of(receiver, unknown, 1))
    assert lost.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert "imgserve.model.name" not in lost.attributes  # never resolved


def test_native_calls_and_stream_messages_are_spans_of_their_own(
    server: ServerProcess, receiver: OtlpReceiver
) -> None:
    native, stream = Caller(), Caller()
    tensor = classifier_pb2.Tensor(shape=list(SHAPE), datatype="FP32", data=images().tobytes())
    classify = classifier_pb2.ClassifyRequest(
        model=MODEL, images=[classifier_pb2.Image(tensor=tensor)]
    )
    with own_channel(server.target) as channel:
        classifier_method(channel, "Classify")(classify, metadata=native.metadata, timeout=30)
        messages = [infer_request(images(n)) for n in (1, 2)]
        answers = list(
            kserve_method(channel, "ModelStreamInfer")(
                iter(messages), metadata=stream.metadata, timeout=30
            )
        )
        assert len(answers) == 2 and not any(a.error_message for a in answers)
    request = request_span(spans_of(receiver, native, 5))
    assert request.name == "imgserve.classifier.v1.Classifier/Classify"
    assert request.attributes["imgserve.api"] == "native"
    assert request.parent_span_id == native.span_id
    spans = spans_of(receiver, stream, 10)
    streamed = [s for s in spans if s.kind == SERVER]
    assert len(streamed) == 2  # one per message, both children of the caller's span
    assert {s.parent_span_id for s in streamed} == {stream.span_id}
    assert sorted(s.attributes["imgserve.images"] for s in streamed) == [1, 2]
    assert {s.name for s in streamed} == {"inference.GRPCInferenceService/ModelStreamInfer"}


def test_an_unsampled_caller_leaves_no_spans_and_no_trace_on_its_log_lines(
    server: ServerProcess, receiver: OtlpReceiver
) -> None:
    quiet, loud = Caller(sampled=False), Caller()
    with own_channel(server.target) as channel:
        for caller in (quiet, loud):
            with pytest.raises(grpc.RpcError):
                infer(channel, caller, infer_request(images(1, (1, 27, 27))))
    spans_of(receiver, loud, 2)  # sent after the unsampled call, by the same worker
    assert receiver.spans(quiet.trace_id) == []
    quiet_line = log_entry(server, quiet.request_id)
    assert "trace_id" not in quiet_line


def log_entry(server: ServerProcess, request_id: str) -> dict[str, Any]:
    """The server's JSON log line about the request `request_id`."""

    def find(lines: list[str]) -> dict[str, Any] | None:
        for line in lines:
            if request_id in line:
                entry = json.loads(line[line.index("{") :])
                if entry.get("request_id") == request_id:
                    return entry
        return None

    return server._wait(find, f"a log line of {request_id}", 10)


def test_log_lines_carry_the_trace_id(server: ServerProcess, receiver: OtlpReceiver) -> None:
    caller = Caller()
    with own_channel(server.target) as channel, pytest.raises(grpc.RpcError):
        infer(channel, caller, infer_request(images(1, (1, 27, 27))))
    request = request_span(spans_of(receiver, caller, 2))
    entry = log_entry(server, caller.request_id)
    assert "INVALID_ARGUMENT" in entry["message"]
    assert entry["trace_id"] == caller.trace_id
    assert entry["span_id"] == request.span_id


def scrape(server: ServerProcess, accept: str | None) -> str:
    headers = {"Accept": accept} if accept else {}
    request = urllib.request.Request(server.metrics_url, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def exemplars(text: str) -> dict[tuple[str, str, str, str], tuple[float, float]]:
    """(histogram, model, trace id, span id) -> (exemplar value, bucket bound) of a page."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.exemplar is not None:
                ids = sample.exemplar.labels
                key = (family.name, sample.labels["model"], ids["trace_id"], ids["span_id"])
                found[key] = (sample.exemplar.value, float(sample.labels["le"]))
    return found


def channels_by_worker(server: ServerProcess) -> dict[int | None, grpc.Channel]:
    """One channel on each worker (None: the lone server's)."""
    found: dict[int | None, grpc.Channel] = {}
    for _ in range(CHANNELS):
        channel = own_channel(server.target)
        worker = infer(channel, Caller(), infer_request(images()))
        if worker in found:
            channel.close()
        else:
            found[worker] = channel
        if len(found) == workers_of(server):
            return found
    raise AssertionError(f"{CHANNELS} channels reached workers {sorted(found, key=str)} only")


def test_exemplars_lead_from_the_latency_buckets_to_the_traces(
    server: ServerProcess, receiver: OtlpReceiver
) -> None:
    """Each model is called last on a different worker, so each is newest in its buckets on
    one worker only: every scrape shows both, whichever worker answers it, because the worker
    that answers gathers the others' exemplars."""
    channels = channels_by_worker(server)
    workers = sorted(channels, key=str)
    calls = []
    try:
        for worker, model in ((workers[0], MODEL), (workers[-1], BATCHED)):
            caller = Caller()
            infer(channels[worker], caller, infer_request(images(), model))
            calls.append((caller, model))
    finally:
        for channel in channels.values():
            channel.close()
    expected = {}
    for caller, model in calls:
        spans = spans_of(receiver, caller, 5)
        request = request_span(spans)
        (queue,) = children(spans, request)["queue"]
        expected[(REQUEST_METRIC, model, caller.trace_id, request.span_id)] = request
        expected[(QUEUE_METRIC, model, caller.trace_id, queue.span_id)] = queue
    for _ in range(3 * len(workers)):  # a new connection each: any worker answers
        found = exemplars(scrape(server, OPENMETRICS))
        assert set(expected) <= set(found), f"missing: {set(expected) - set(found)}"
        for key, span in expected.items():
            value, bound = found[key]
            assert value <= bound  # in the bucket it is shown on
            assert value == pytest.approx((span.end_ns - span.start_ns) / 1e9, abs=0.005)
    assert exemplars(scrape(server, OPENMETRICS))  # parsed as OpenMetrics
    assert "# {" not in scrape(server, None)  # the classic text format has no exemplars


def exemplar_queries() -> list[str]:
    """The dashboard's queries that show exemplars, as test_deploy_live sends them."""
    wanted = {
        f"panel {panel['title']!r} {target['refId']}"
        for panel in dashboard_panels()
        for target in panel["targets"]
        if target.get("exemplar")
    }
    return [e.promql for e in dashboard_expressions() if e.where in wanted]


def test_prometheus_keeps_the_exemplars_the_dashboard_shows(
    server: ServerProcess, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    """A real Prometheus with exemplar storage scrapes the server; the exemplars of the
    dashboard's trace panels come back from its query_exemplars API, as Grafana asks."""
    queries = exemplar_queries()
    assert len(queries) >= 2, "the dashboard has no panel with exemplars"
    prometheus = Prometheus(
        tool("prometheus"), tmp_path, f"127.0.0.1:{server.metrics_port}",
        flags=["--enable-feature=exemplar-storage"],
    )  # fmt: skip
    prometheus.start()
    try:
        prometheus.wait_until(lambda: bool(prometheus.query("up == 1")), "scraping", 30)
        caller = Caller()
        with own_channel(server.target) as channel:
            infer(channel, caller, infer_request(images()))
        spans_of(receiver, caller, 5)

        def stored(query: str) -> set[str]:
            now = time.time()
            series = prometheus.api(
                "query_exemplars", query=query, start=str(now - 600), end=str(now)
            )
            return {e["labels"]["trace_id"] for s in series for e in s["exemplars"]}

        for query in queries:
            prometheus.wait_until(
                lambda q=query: caller.trace_id in stored(q), f"exemplars of {query}", 30
            )
    finally:
        prometheus.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_tracing_is_off_by_default_and_sends_nothing(
    serve: Callable[..., ServerProcess], workers: int
) -> None:
    receiver = OtlpReceiver()  # where spans would go, were the endpoint set
    try:
        server = serve("--workers", str(workers), models=[MODEL], env=BLANK_OTEL)
        callers = [Caller() for _ in range(4)]
        with own_channel(server.target) as channel:
            for caller in callers:
                infer(channel, caller, infer_request(images()))
        page = scrape(server, OPENMETRICS)
        assert "imgserve_request_duration_seconds_bucket" in page and "# {" not in page
        assert server.stop() == 0  # a stop would send any span left (see below)
        assert receiver.spans() == []
        assert "tracing on" not in server.log
    finally:
        receiver.stop()


@pytest.fixture(scope="module")
def held(serve: Callable[..., ServerProcess]) -> Iterator[tuple[ServerProcess, OtlpReceiver]]:
    """Two workers logging text, whose spans wait for the exporter's schedule: ten minutes,
    longer than the tests, so only a stop sends them."""
    receiver = OtlpReceiver()
    try:
        server = serve(
            "--workers", "2", "--log-level", "debug", models=[MODEL],
            env=on_env(receiver, OTEL_BSP_SCHEDULE_DELAY="600000"),
        )  # fmt: skip
        yield server, receiver
    finally:
        receiver.stop()


def test_text_log_lines_carry_the_trace_id(held: tuple[ServerProcess, OtlpReceiver]) -> None:
    server, _ = held
    traced, untraced = Caller(), Caller(sampled=False)
    with own_channel(server.target) as channel:
        for caller in (traced, untraced):
            with pytest.raises(grpc.RpcError):
                infer(channel, caller, infer_request(images(1, (1, 27, 27))))
    server.wait_for(
        re.compile(re.escape(f"[{traced.request_id} trace={traced.trace_id}] request answered")),
        10,
    )
    line = server.wait_for(re.compile(re.escape(f"[{untraced.request_id}]") + ".*"), 10)[0]
    assert "trace=" not in line


def test_a_stopping_server_sends_its_last_spans(held: tuple[ServerProcess, OtlpReceiver]) -> None:
    server, receiver = held
    callers = [Caller() for _ in range(6)]
    for caller in callers:
        with own_channel(server.target) as channel:
            infer(channel, caller, infer_request(images()))
    time.sleep(0.5)
    assert receiver.spans() == []  # nothing sent while it runs
    server.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0
    received = {s.trace_id for s in receiver.spans() if s.kind == SERVER}
    assert received >= {c.trace_id for c in callers}


def test_a_bad_tracing_setting_stops_the_start_with_a_reason(tmp_path: Path) -> None:
    env = {
        **BLANK_OTEL,
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
        "OTEL_TRACES_SAMPLER": "sometimes",
    }
    server = ServerProcess(tmp_path, "--workers", "1", env=env, until_started=False)
    with pytest.raises(AssertionError, match="exited"):
        server.start(timeout=60)
    assert server.wait(10) == 1
    assert "tracing: unknown trace sampler 'sometimes'" in server.log


def settings(*args: str) -> Any:
    return parse_settings(["--model-repository", ".", *args], env={})


@pytest.mark.parametrize(
    ("args", "env", "endpoint"),
    [
        ((), {}, None),  # off by default
        ((), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, "http://c:4317"),
        ((), {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4317"}, "http://t:4317"),
        (
            (),
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4317",
            },
            "http://t:4317",
        ),
        (
            ("--otel-endpoint", "http://f:4317"),
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"},
            "http://f:4317",
        ),
        ((), {"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, None),  # empty is unset
        ((), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"}, None),
        (
            (),
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none"},
            None,
        ),
    ],
)
def test_what_turns_tracing_on(
    args: tuple[str, ...], env: dict[str, str], endpoint: str | None
) -> None:
    config = config_from(settings(*args), env)
    assert (config.endpoint if config else None) == endpoint


def test_sampler_and_resource_settings_flags_over_variables() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
    }
    config = config_from(settings(), env)
    assert config is not None
    assert (config.sampler, config.ratio) == ("parentbased_traceidratio", 0.25)
    flagged = config_from(
        settings(
            "--otel-sampler", "traceidratio", "--otel-sampler-ratio", "0.01",
            "--otel-service-name", "edge", "--otel-resource-attributes", "team=vision,zone=eu%2C1",
        ),
        env,
    )  # fmt: skip
    assert flagged is not None
    assert (flagged.sampler, flagged.ratio, flagged.service_name) == ("traceidratio", 0.01, "edge")
    assert flagged.resource_attributes == {"team": "vision", "zone": "eu,1"}
    assert config_from(settings(), {**env, "OTEL_TRACES_SAMPLER": "always_on"}).ratio == 1.0


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "unknown trace sampler"),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"},
            "not a number",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
            "between 0 and 1",
        ),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "OTLP/gRPC only"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "only otlp"),
    ],
)
def test_settings_that_cannot_be_served_are_refused(env: dict[str, str], reason: str) -> None:
    with pytest.raises(TracingConfigError, match=reason):
        config_from(settings(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", **env})


def test_resource_attributes_must_be_key_value_pairs() -> None:
    assert parse_attributes(" a=1 , b = x=y ,") == {"a": "1", "b": "x=y"}
    with pytest.raises(TracingConfigError, match="not key=value"):
        parse_attributes("a=1,oops")


def test_the_ratio_flag_is_checked_at_parse_time() -> None:
    with pytest.raises(SystemExit):
        settings("--otel-sampler-ratio", "1.5")
