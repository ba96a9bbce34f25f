"""A runtime that computes nothing: uniform probabilities of the right shape.

For benchmarks only (`--null-compute`): a server with this runtime still decodes, queues,
batches, splits and encodes every request, so what it serves is the ceiling the transport
and the batcher allow, with the model's cost taken out.
"""

from __future__ import annotations

import numpy as np


class NullRuntime:
    device = "none"

    def __init__(self, num_classes: int) -> None:
        self._num_classes = num_classes

    def run(self, batch: np.ndarray) -> np.ndarray:
        return np.full((batch.shape[0], self._num_classes), 1.0 / self._num_classes, np.float32)

    def close(self) -> None:
        pass
