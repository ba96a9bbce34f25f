"""The one interface every runtime implements, and the error raised when one cannot load."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class RuntimeLoadError(Exception):
    """A model file cannot be served by a runtime; the message says why, for the model's state."""


def first_line(exc: BaseException) -> str:
    """The headline of a runtime's error: their messages run to many lines of internals."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Runtime(Protocol):
    """One loaded copy of a model on one device.

    `run` blocks and is called from one dedicated worker thread per instance (never from the
    event loop), so implementations need no locking and may release the GIL.
    """

    device: str  # "cpu" or "cuda:0": where it actually runs

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, C, H, W) in [0, 1] -> float32 (N, classes)."""
        ...

    def close(self) -> None:
        """Free the session or module; `run` is not called afterwards."""
        ...
