"""A model's tensors as its config.pbtxt declares them, and Triton's checks of a request
against them.

The config is the contract, as in Triton: names, datatypes and dims (`-1` for a variable
size), the implicit batch dimension when max_batch_size > 0, `reshape` (the shape the model
itself takes or gives, when it differs from what clients see), `optional` inputs and label
files. The checks raise InvalidInputError with Triton's wording, so a client written against
Triton reads the same reasons here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from modelrepo.config import ModelConfig
from modelrepo.datatypes import Datatype, from_config_type
from server.errors import InvalidInputError
from wire import model_config_pb2

FORMATS = {
    model_config_pb2.ModelInput.FORMAT_NONE: "FORMAT_NONE",
    model_config_pb2.ModelInput.FORMAT_NCHW: "FORMAT_NCHW",
    model_config_pb2.ModelInput.FORMAT_NHWC: "FORMAT_NHWC",
}


class SignatureError(ValueError):
    """A config whose tensors cannot be served; str() is the reason."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: Datatype
    dims: tuple[int, ...]  # without the batch dimension; -1: any size
    reshape: tuple[int, ...] | None  # the model's own shape (without batch), when it differs
    optional: bool = False
    format: str = "FORMAT_NONE"
    label_filename: str = ""

    @property
    def model_dims(self) -> tuple[int, ...]:
        """The dims as the model itself takes or gives them (reshape wins), past the batch."""
        return self.reshape if self.reshape is not None else self.dims

    def shown_dims(self, batched: bool) -> list[int]:
        """The dims as clients see them (ModelMetadata, messages): -1 leads when batched."""
        return [-1, *self.dims] if batched else list(self.dims)

    def matches(self, shape: Sequence[int], batched: bool) -> bool:
        body = tuple(shape[1:] if batched else shape)
        if batched and (len(shape) < 1 or shape[0] < 1):
            return False
        if body == self.dims:
            return True
        return (
            -1 in self.dims
            and len(body) == len(self.dims)
            and all(d == -1 or d == s for d, s in zip(self.dims, body, strict=True))
        )


@dataclass(frozen=True)
class Signature:
    model: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batched: bool  # max_batch_size > 0: the first dim of every tensor is the batch
    # Looked up per request: built once.
    _inputs: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)
    _outputs: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)
    _required: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_inputs", {t.name: t for t in self.inputs})
        object.__setattr__(self, "_outputs", {t.name: t for t in self.outputs})
        required = tuple(t.name for t in self.inputs if not t.optional)
        object.__setattr__(self, "_required", required)

    def input(self, name: str) -> TensorSpec | None:
        return self._inputs.get(name)

    def output(self, name: str) -> TensorSpec | None:
        return self._outputs.get(name)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def check_inputs(self, declared: Mapping[str, tuple[str, Sequence[int]]]) -> None:
        """Triton's checks of a request's inputs (name -> (datatype, shape)), in its order:
        unknown names, missing required inputs, datatypes, shapes."""
        specs = self._inputs
        if len(declared) == len(specs) == 1:  # the common case: one input, known or not
            ((name, (datatype, shape)),) = declared.items()
            spec = specs.get(name)
            if (
                spec is not None
                and datatype == spec.datatype.name
                and spec.matches(shape, self.batched)
            ):
                return
        for name in declared:
            if name not in specs:
                allowed = ", ".join(t.name for t in self.inputs)
                raise InvalidInputError(
                    f"unexpected inference input '{name}' for model '{self.model}', "
                    f"allowed inputs are: {allowed}"
                )
        required = self._required
        missing = [n for n in required if n not in declared]
        if missing:
            raise InvalidInputError(
                f"expected {len(required)} inputs but got {len(declared)} inputs for model "
                f"'{self.model}'. Got input(s) {_names(declared)}, but missing required "
                f"input(s) {_names(missing)}. Please provide all required input(s)."
            )
        for name, (datatype, shape) in declared.items():
            spec = self.input(name)
            assert spec is not None
            if datatype != spec.datatype.name:
                raise InvalidInputError(
                    f"inference input '{name}' data-type is '{datatype}', but model "
                    f"'{self.model}' expects '{spec.datatype.name}'"
                )
            if not spec.matches(shape, self.batched):
                raise InvalidInputError(
                    f"unexpected shape for input '{name}' for model '{self.model}'. Expected "
                    f"{_dims(spec.shown_dims(self.batched))}, got {_dims(shape)}"
                )
        if self.batched and declared:
            sizes = {shape[0] for _, shape in declared.values()}
            if len(sizes) > 1:
                raise InvalidInputError(
                    f"inputs of model '{self.model}' must have the same batch size, got "
                    + ", ".join(f"{n}: {s[0]}" for n, (_, s) in declared.items())
                )

    def check_output(self, name: str) -> TensorSpec:
        spec = self.output(name)
        if spec is None:
            raise InvalidInputError(
                f"unexpected inference output '{name}' for model '{self.model}'"
            )
        return spec


def _names(names: object) -> str:
    return "[" + ", ".join(f"'{n}'" for n in names) + "]"  # type: ignore[attr-defined]


def _dims(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def from_config(config: ModelConfig) -> Signature:
    """The config's tensors, checked as Triton checks them at load. Raises SignatureError."""
    if not config.input:
        raise SignatureError("the config declares no inputs")
    if not config.output:
        raise SignatureError("the config declares no outputs")
    inputs = tuple(_tensor(t, "input") for t in config.input)
    outputs = tuple(_tensor(t, "output") for t in config.output)
    for kind, tensors in (("input", inputs), ("output", outputs)):
        names = [t.name for t in tensors]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise SignatureError(f"{kind} '{duplicate}' is declared more than once")
    return Signature(config.name, inputs, outputs, config.max_batch_size > 0)


def _tensor(
    tensor: model_config_pb2.ModelInput | model_config_pb2.ModelOutput, kind: str
) -> TensorSpec:
    if not tensor.name:
        raise SignatureError(f"an {kind} has no name")
    datatype = from_config_type(tensor.data_type)
    if datatype is None:
        type_name = model_config_pb2.DataType.Name(tensor.data_type)
        raise SignatureError(f"{kind} '{tensor.name}' has data type {type_name}, not served")
    dims = tuple(int(d) for d in tensor.dims)
    if any(d < -1 or d == 0 for d in dims):
        raise SignatureError(f"{kind} '{tensor.name}' dims {list(dims)}: sizes are > 0 or -1")
    reshape = tuple(int(d) for d in tensor.reshape.shape) if tensor.HasField("reshape") else None
    fixed = reshape is not None and -1 not in dims and -1 not in reshape
    if fixed and math.prod(reshape) != math.prod(dims):  # type: ignore[arg-type]
        raise SignatureError(
            f"{kind} '{tensor.name}' reshape {list(reshape or ())} does not hold the "
            f"{math.prod(dims)} elements of dims {list(dims)}"
        )
    is_input = isinstance(tensor, model_config_pb2.ModelInput)
    return TensorSpec(
        name=tensor.name,
        datatype=datatype,
        dims=dims,
        reshape=reshape,
        optional=bool(is_input and tensor.optional),
        format=FORMATS.get(tensor.format, "FORMAT_NONE") if is_input else "FORMAT_NONE",
        label_filename="" if is_input else tensor.label_filename,
    )
