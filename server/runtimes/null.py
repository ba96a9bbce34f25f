"""A runtime that computes nothing: uniform probabilities in every output's shape.

For benchmarks only (`--null-compute`): a server with this runtime still decodes, queues,
batches, splits and encodes every request, so what it serves is the ceiling the transport
and the batcher allow, with the model's cost taken out.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from server.runtimes.base import Tensors


class NullRuntime:
    device = "none"

    def __init__(
        self, outputs: Mapping[str, tuple[tuple[int, ...], np.dtype]], batched: bool = True
    ) -> None:
        """`outputs`: each output's dims past the batch dimension (variable ones as 1) and
        dtype; `batched`: whether the tensors lead with a batch dimension."""
        self._outputs = {n: (tuple(max(d, 1) for d in dims), t) for n, (dims, t) in outputs.items()}
        self._batched = batched

    def run(self, inputs: Tensors) -> dict[str, np.ndarray]:
        lead = (next(iter(inputs.values())).shape[0],) if self._batched and inputs else ()
        answer = {}
        for name, (dims, dtype) in self._outputs.items():
            size = dims[-1] if dims else 1
            answer[name] = np.full((*lead, *dims), 1.0 / size, np.float32).astype(dtype)
        return answer

    def close(self) -> None:
        pass
