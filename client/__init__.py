"""Client of the image-classification server's native API: a library and `python -m client`."""

from client.api import (
    DEFAULT_TARGET,
    AsyncClassifierClient,
    ClassifierClient,
    ClientError,
    ImageInput,
    ModelInfo,
    Prediction,
    Result,
    StreamResult,
)

__all__ = [
    "DEFAULT_TARGET",
    "AsyncClassifierClient",
    "ClassifierClient",
    "ClientError",
    "ImageInput",
    "ModelInfo",
    "Prediction",
    "Result",
    "StreamResult",
]
