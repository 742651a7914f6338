"""Client library of the akidb-embed daemon: blocking ``Client`` and asyncio ``AsyncClient``."""

from .aio import AsyncClient
from .client import Client, Embeddings
from .errors import (
    BadRequest,
    EmbedError,
    InputTooLong,
    InsufficientMemory,
    InternalError,
    ModelChanged,
    ModelUnavailable,
    NoModelFits,
    NotAllowed,
    Overloaded,
    ShuttingDown,
    Unavailable,
    UnknownModel,
    UnsupportedVersion,
)
from .events import EventStream
from .protocol import AUTO_MODEL, KEEP_ALIVE_FOREVER, Event

__version__ = "0.1.0"

__all__ = [
    "AUTO_MODEL",
    "AsyncClient",
    "BadRequest",
    "Client",
    "EmbedError",
    "Embeddings",
    "Event",
    "EventStream",
    "InputTooLong",
    "InsufficientMemory",
    "InternalError",
    "KEEP_ALIVE_FOREVER",
    "ModelChanged",
    "ModelUnavailable",
    "NoModelFits",
    "NotAllowed",
    "Overloaded",
    "ShuttingDown",
    "Unavailable",
    "UnknownModel",
    "UnsupportedVersion",
    "__version__",
]
