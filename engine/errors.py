"""Errors the engine raises to its caller; the server maps each to an HTTP status."""


class EngineError(Exception):
    """Base of the engine's errors."""


class InvalidRequestError(EngineError, ValueError):
    """The request can never be served as asked (empty prompt, prompt over the context,
    bad parameter). The message names the field and why. HTTP 400."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class EngineDeadError(EngineError):
    """The step loop failed and cannot continue; no request will be served. HTTP 503."""
