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
from client.credentials import TOKEN_ENV, Credentials

__all__ = [
    "DEFAULT_TARGET",
    "TOKEN_ENV",
    "AsyncClassifierClient",
    "ClassifierClient",
    "ClientError",
    "Credentials",
    "ImageInput",
    "ModelInfo",
    "Prediction",
    "Result",
    "StreamResult",
]
