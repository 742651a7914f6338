"""Client library of the akidb-embed daemon: blocking ``Client`` and asyncio ``AsyncClient``."""

from .aio import AsyncClient
from .client import Client, Embeddings
from .errors import (
    BadRequest,
    EmbedError,
    InputTooLong,
    InsufficientMemory,
    InternalError,
    ModelUnavailable,
    Overloaded,
    ShuttingDown,
    Unavailable,
    UnknownModel,
    UnsupportedVersion,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "EmbedError",
    "Embeddings",
    "InputTooLong",
    "InsufficientMemory",
    "InternalError",
    "ModelUnavailable",
    "Overloaded",
    "ShuttingDown",
    "Unavailable",
    "UnknownModel",
    "UnsupportedVersion",
    "__version__",
]
