"""Every metric the dashboard and the alert rules query is on /metrics from the start.

Before the first request, with one worker and with several: prometheus_client's multiprocess
mode (--workers 2) shows only the families some worker wrote, so a family whose series are
created by the first request was missing until then, and its panels and alerts pointed at
nothing. The server touches every family and every label set it knows in advance at zero
(server.observability.metrics); this reads the imgserve_* names out of the PromQL of the alert
rules, the dashboard (its panels and variables) and the autoscaling example, and looks for
their families on a live page.

The GPU families are the one difference between machines: the server declares them (HELP and
TYPE lines) everywhere, so they must be on the page, but they have samples only where NVML
sees a GPU, so their samples are not asked for.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from deploy_tools import GPU_METRICS, METRIC_NAME, all_expressions, dashboard_label_queries
from generated_models import write_fixed_batch_model
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from server_process import ServerProcess

MODEL = "tiny"
# A queried series name's family: histogram series end in _bucket/_sum/_count, counters in
# _total; anything else is the family's own name (a gauge).
SUFFIXES = {"_bucket": "histogram", "_sum": "histogram", "_count": "histogram", "_total": "counter"}
# Families whose series the first request used to create (the multiprocess page lacked them).
FIRST_WRITTEN_BY_A_REQUEST = {
    "imgserve_requests",
    "imgserve_request_duration_seconds",
    "imgserve_inflight_requests",
    "imgserve_auth_rejections",
}
APIS = {"kserve", "native", "http"}


def queried_names() -> set[str]:
    """Every imgserve_* name in the rules', the dashboard's and the autoscaling example's
    PromQL, and in the dashboard variables' selectors."""
    names = set().union(*(e.metric_names for e in all_expressions()))
    for _variable, selector, _label in dashboard_label_queries():
        names.update(METRIC_NAME.findall(selector))
    return names


def family_of(name: str) -> tuple[str, str | None]:
    """(family name, its type; None for a plain name, which is a gauge's or the family's)."""
    for suffix, kind in SUFFIXES.items():
        if name.endswith(suffix):
            return name.removesuffix(suffix), kind
    return name, None


def test_the_queried_families_include_those_a_request_used_to_create() -> None:
    """Guards the live test below against reading too few names from the deploy files."""
    families = {family_of(name)[0] for name in queried_names()}
    assert len(families) >= 15, families
    assert families >= FIRST_WRITTEN_BY_A_REQUEST, families
    assert {family_of(name)[0] for name in GPU_METRICS} <= families


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("one_model")
    write_fixed_batch_model(repository, MODEL, max_batch_size=1)
    return repository


def page(server: ServerProcess) -> dict[str, tuple[str, list[Sample]]]:
    """Family name -> (type, samples) of the server's /metrics."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_every_queried_family_is_on_metrics_before_any_request(
    repository: Path, workers: str
) -> None:
    with ServerProcess(repository, "--workers", workers) as server:
        families = page(server)  # no request was made: start() returns on the start-up line
    gpu = {family_of(name)[0] for name in GPU_METRICS}
    queried = {name: family_of(name) for name in sorted(queried_names())}
    missing = sorted({family for family, _ in queried.values()} - families.keys())
    assert not missing, f"queried, not on /metrics with {workers} worker(s): {missing}"
    for name, (family, kind) in queried.items():
        declared, samples = families[family]
        assert kind is None or declared == kind, f"{name}: {family} is a {declared}"
        if family in gpu:
            continue  # declared everywhere, samples only where NVML sees a GPU (module doc)
        assert samples, f"{family}: declared without a series with {workers} worker(s)"
        by_model = [s for s in samples if "model" in s.labels]
        assert not by_model or any(s.labels["model"] == MODEL for s in by_model), (
            f"{family}: no series for the served model {MODEL}: {by_model}"
        )
    _, requests = families["imgserve_requests"]
    answered = {s.labels["api"] for s in requests if s.labels.get("code") == "OK"}
    assert answered == APIS, f"success counts at 0 for each API: {answered}"
    _, rejections = families["imgserve_auth_rejections"]
    assert {s.labels["code"] for s in rejections} == {"UNAUTHENTICATED", "PERMISSION_DENIED"}
    counted = [s for _, samples in families.values() for s in samples if _counts(s)]
    assert counted and all(s.value == 0 for s in counted), "a request was counted"


def _counts(sample: Sample) -> bool:
    """A count (of requests, batches, restarts...) or a histogram's series."""
    return sample.name.endswith(("_total", "_sum", "_count", "_bucket"))
