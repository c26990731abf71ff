"""Errors the engine raises to its caller; the server maps each to an HTTP status."""


class EngineError(Exception):
    """Base of the engine's errors."""


class InvalidRequestError(EngineError, ValueError):
    """The request can never be served as asked (empty prompt, prompt over the context,
    bad parameter). The message names the parameter and why. HTTP 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineDeadError(EngineError):
    """The engine core has stopped and cannot serve (a failed step, a dead core process,
    shutdown). HTTP 503."""
