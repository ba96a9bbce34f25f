"""What each served model version counts for the statistics extension, free of any protocol.

Triton's definitions (docs/protocol/extension_statistics.md), as this server measures them:
- per request, counted once when it succeeds, however many chunks an oversized request was
  split into: `success` (from the start of its decoding to the end of its encoding), `queue`
  (the longest wait of its chunks), `compute_input` (its decoding, plus the assembly of each
  batch it ran in), `compute_infer` (the runtime's time for each batch it ran in),
  `compute_output` (the split of each batch it ran in, plus its encoding). These four counts
  are always equal, as clients such as perf_analyzer require;
- `fail`: requests that reached a model and failed (bad input, full queue, timeout, runtime
  error); a caller that hangs up is neither success nor failure;
- per executed batch size (`batch_stats`): one count per batch in each of compute_input (the
  assembly plus the decoding of the requests in it), compute_infer (the runtime) and
  compute_output (the split plus the encoding of its requests; a request split over several
  batches shares its decoding and encoding among them by rows). The encoding is added once
  each request has been encoded, after the batch itself was counted;
- `inference_count` (images) and `execution_count` (batches) of successful batches.

The server's statistics answer (server.core.statistics) converts these to protocol messages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchStats:
    """One executed batch size."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


class Timing:
    """One request's clock: started at its arrival, filled by decoding, the batcher and
    encoding, and recorded into ModelStats once it is answered."""

    __slots__ = (
        "answered", "batches", "decode_ns", "infer_ns", "input_ns", "output_ns", "queue_ns",
        "started",
    )  # fmt: skip

    def __init__(self) -> None:
        self.started = time.perf_counter_ns()
        self.decode_ns = 0  # decoding the request, before it was queued
        self.queue_ns = 0  # the longest wait of its chunks
        self.input_ns = 0  # assembling the batches it ran in
        self.infer_ns = 0  # the runtime, for the batches it ran in
        self.output_ns = 0  # splitting the batches it ran in
        self.answered = 0  # perf_counter_ns when the batcher gave its rows back (0: not yet)
        # (batch size, this request's share of the rows it sent) for each batch it ran in
        self.batches: list[tuple[int, float]] = []

    def decoded(self) -> None:
        """The request is decoded: the time since its start was its decoding."""
        self.decode_ns = time.perf_counter_ns() - self.started

    def ran(
        self, rows: int, share: float, waited_ns: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """`share` of the request's rows ran in a batch of `rows` images."""
        self.queue_ns = max(self.queue_ns, waited_ns)
        self.input_ns += input_ns
        self.infer_ns += infer_ns
        self.output_ns += output_ns
        self.batches.append((rows, share))


class ModelStats:
    """The counts of one loaded version; changed from its event loop only."""

    def __init__(self) -> None:
        self.inference_count = 0  # images in successful batches
        self.execution_count = 0  # successful batches
        self.last_inference_ms = 0  # wall-clock ms since the epoch of the last success
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.batches: dict[int, BatchStats] = {}  # by batch size

    @property
    def success_count(self) -> int:
        return self.success.count

    def batch(self, rows: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """A batch of `rows` images ran: one count in each duration of its batch size."""
        stats = self.batches.get(rows)
        if stats is None:
            stats = self.batches[rows] = BatchStats()
        stats.compute_input.add(input_ns)
        stats.compute_infer.add(infer_ns)
        stats.compute_output.add(output_ns)
        self.inference_count += rows
        self.execution_count += 1

    def succeeded(self, timing: Timing) -> None:
        """The request was answered: everything since the batcher gave its rows back was
        its encoding."""
        end = time.perf_counter_ns()
        encode_ns = end - timing.answered if timing.answered else 0
        self.success.add(end - timing.started)
        self.queue.add(timing.queue_ns)
        self.compute_input.add(timing.decode_ns + timing.input_ns)
        self.compute_infer.add(timing.infer_ns)
        self.compute_output.add(timing.output_ns + encode_ns)
        for rows, share in timing.batches:
            stats = self.batches.get(rows)
            if stats is not None:
                stats.compute_output.ns += int(encode_ns * share)
        self.last_inference_ms = int(time.time() * 1000)

    def failed(self, timing: Timing) -> None:
        self.fail.add(time.perf_counter_ns() - timing.started)
