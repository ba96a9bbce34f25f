"""Exceptions of the serving core, and the one that stops a server from starting.

They know nothing of gRPC: `server.api.status` holds the one table that maps them to
status codes. Messages are meant for the caller, so they say what was expected.
"""


class StartupError(Exception):
    """The server cannot start (bad repository, port in use); str() is the one-line reason."""


class ServingError(Exception):
    """Base of every error the core reports to a caller."""


class ModelNotFoundError(ServingError):
    """Unknown model name or version."""


class InvalidInputError(ServingError):
    """Malformed request: wrong tensor name, shape, datatype or byte length, undecodable image."""


class QueueFullError(ServingError):
    """The model's queue is at capacity; the caller should back off and retry."""


class DeadlineExceededError(ServingError):
    """The request's deadline passed before it reached the runtime."""


class ModelUnavailableError(ServingError):
    """The model exists but is not ready (loading, failed, unloaded) or the server is draining."""


class UnsupportedError(ServingError):
    """A valid request for something this server does not implement."""


class RepositoryPollError(ServingError):
    """A load refused before anything loads (a malformed override): INTERNAL, as Triton answers
    it ("failed to load 'NAME', failed to poll from model repository"; its own clients check
    that code), with the reason, which Triton only logs."""


class ModelControlDisabledError(ServingError):
    """A repository load/unload on a server started without --enable-model-control."""
