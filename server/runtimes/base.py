"""The one interface every runtime implements, and the error raised when one cannot load."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from modelrepo.datatypes import DATATYPES, Datatype
from modelrepo.layout import INPUT_NAME, OUTPUT_NAME

# A batch's tensors by name: the runtime's input and output.
Tensors = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Interface:
    """The tensors the config declares, in its order: what a runtime checks its model file
    against at load and feeds or returns at run."""

    inputs: tuple[tuple[str, Datatype], ...]
    outputs: tuple[tuple[str, Datatype], ...]

    @property
    def output_names(self) -> list[str]:
        return [name for name, _ in self.outputs]


# Our training package's exports: float32 pixels `input`, float32 `probabilities`.
OWN_EXPORT = Interface(((INPUT_NAME, DATATYPES["FP32"]),), ((OUTPUT_NAME, DATATYPES["FP32"]),))


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

    def run(self, inputs: Tensors) -> dict[str, np.ndarray]:
        """The model's inputs by name (in the model's own shapes and dtypes; BYTES as object
        arrays of bytes) -> every output the config names, by name."""
        ...

    def close(self) -> None:
        """Free the session or module; `run` is not called afterwards."""
        ...
