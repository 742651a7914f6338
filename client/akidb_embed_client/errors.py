"""Errors of akidb-embed: one class per wire code, shared by the daemon and the client."""

from __future__ import annotations

from typing import Any


class EmbedError(Exception):
    """An error with a stable wire ``code``, a message naming the cause and the fix, and ``details``: the figures
    behind it as plain msgpack values (sent on the wire beside the message)."""

    code = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class BadRequest(EmbedError):
    code = "bad_request"


class UnsupportedVersion(EmbedError):
    code = "unsupported_version"


class UnknownModel(EmbedError):
    code = "unknown_model"


class ModelUnavailable(EmbedError):
    code = "model_unavailable"

    @property
    def retry_after(self) -> float | None:
        """Seconds until the daemon tries the model again (its circuit is open), if it said."""
        retry_after_ms = self.details.get("retry_after_ms")
        return retry_after_ms / 1e3 if retry_after_ms is not None else None


class ModelChanged(EmbedError):
    """The model now serving has another fingerprint than the request expected: its vectors would not mix."""

    code = "model_changed"

    @property
    def expected(self) -> str | None:
        return self.details.get("expected_fingerprint")

    @property
    def fingerprint(self) -> str | None:
        return self.details.get("fingerprint")


class NoModelFits(EmbedError):
    """No model meets an ``auto`` request's constraints; ``candidates`` says what each one failed."""

    code = "no_model_fits"

    @property
    def candidates(self) -> list[dict[str, Any]]:
        return self.details.get("candidates", [])


class InputTooLong(EmbedError):
    code = "input_too_long"


class Overloaded(EmbedError):
    code = "overloaded"


class NotAllowed(EmbedError):
    """The socket's tenant may not use this op (a cache op its ``cache_ops`` leave out)."""

    code = "not_allowed"


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
        ModelChanged,
        NoModelFits,
        InputTooLong,
        Overloaded,
        NotAllowed,
        InsufficientMemory,
        ShuttingDown,
        InternalError,
    )
}


def error_for(code: str, message: str, details: dict[str, Any] | None = None) -> EmbedError:
    """The exception for a wire code; an unknown code becomes InternalError, keeping the code."""
    cls = ERROR_CLASSES.get(code)
    if cls is None:
        return InternalError(f"[{code}] {message}", **(details or {}))
    return cls(message, **(details or {}))
