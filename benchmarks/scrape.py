"""The mean batch the server formed during a measurement, from its /metrics page.

Read as the change of the `imgserve_batch_size` histogram's sum and count between two
scrapes, so batches formed before the measurement (warm-up, other runs) do not count.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

BATCH_SIZE_METRIC = "imgserve_batch_size"
SCRAPE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class BatchTotals:
    rows: float  # the histogram's sum: images in every batch formed
    batches: float  # its count


def batch_totals(metrics_url: str | None, model: str) -> BatchTotals | None:
    """The model's batch-size histogram totals now; None without a URL or when unreadable."""
    if metrics_url is None:
        return None
    try:
        with urllib.request.urlopen(metrics_url, timeout=SCRAPE_TIMEOUT_S) as response:
            text = response.read().decode()
    except (OSError, urllib.error.URLError):
        return None
    rows = batches = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != BATCH_SIZE_METRIC:
            continue
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name.endswith("_sum"):
                rows += sample.value
            elif sample.name.endswith("_count"):
                batches += sample.value
    return BatchTotals(rows, batches)


def mean_batch(before: BatchTotals | None, after: BatchTotals | None) -> float | None:
    """Images per batch formed between the two scrapes; None if unknown or no batch ran."""
    if before is None or after is None or after.batches <= before.batches:
        return None
    return round((after.rows - before.rows) / (after.batches - before.batches), 3)
