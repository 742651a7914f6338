"""Errors of akidb-embed: one class per wire code, shared by the daemon and the client."""

from __future__ import annotations


class EmbedError(Exception):
    """An error with a stable wire ``code`` and a message naming the cause and the fix."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(EmbedError):
    code = "bad_request"


class UnsupportedVersion(EmbedError):
    code = "unsupported_version"


class UnknownModel(EmbedError):
    code = "unknown_model"


class ModelUnavailable(EmbedError):
    code = "model_unavailable"


class InputTooLong(EmbedError):
    code = "input_too_long"


class Overloaded(EmbedError):
    code = "overloaded"


class InsufficientMemory(EmbedError):
    code = "insufficient_memory"


class ShuttingDown(EmbedError):
    code = "shutting_down"


class InternalError(EmbedError):
    code = "internal"


class Unavailable(EmbedError):
    """Client side only: the daemon did not answer after every retry."""

    code = "unavailable"


ERROR_CLASSES: dict[str, type[EmbedError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        UnsupportedVersion,
        UnknownModel,
        ModelUnavailable,
        InputTooLong,
        Overloaded,
        InsufficientMemory,
        ShuttingDown,
        InternalError,
    )
}


def error_for(code: str, message: str) -> EmbedError:
    """The exception for a wire code; an unknown code becomes InternalError, keeping the code."""
    cls = ERROR_CLASSES.get(code)
    if cls is None:
        return InternalError(f"[{code}] {message}")
    return cls(message)
