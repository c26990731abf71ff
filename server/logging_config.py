"""The server's logging: one handler on stderr for every logger (ours, uvicorn's, the
libraries'), text or JSON lines (--log-format), each line carrying the id of the request
it is about. uvicorn's own access log is off: AccessLogMiddleware writes one line per
request instead, with more in it.

The engine core process logs through the same formats (core_config, handed over in its
CoreSpec): it only names stdlib and python-json-logger classes, so the engine imports
nothing from the server."""

from __future__ import annotations

import logging
import logging.config
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS

from .request_context import current_request

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# The access line's fields after its message ("POST /v1/completions 200").
ACCESS_FIELDS = (
    "prompt_tokens",
    "completion_tokens",
    "ttft_s",
    "duration_s",
    "finish_reason",
    "client",
)
ACCESS_TEXT_FORMAT = TEXT_FORMAT + "".join(f" {name}=%({name})s" for name in ACCESS_FIELDS)
JSON_FIELDS = "%(levelname)s %(name)s %(message)s"
JSON_RENAMES = {"levelname": "level", "name": "logger"}
# Defaults come first in a JSON line: the time and the request id lead every line.
JSON_DEFAULTS = {"time": None, "request_id": None}
# uvicorn's duplicate of its message, with terminal colours.
JSON_SKIPPED = [*RESERVED_ATTRS, "color_message"]
NO_REQUEST = "-"


class RequestIdFilter(logging.Filter):
    """Puts the id of the request being served (or null) on every record as request_id."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            context = current_request()
            record.request_id = context.request_id if context is not None else None
        return True


class TextFormatter(logging.Formatter):
    """A readable line: the request id and access fields that JSON writes as null read '-'."""

    def format(self, record: logging.LogRecord) -> str:
        missing = {
            name: NO_REQUEST
            for name in ("request_id", *ACCESS_FIELDS)
            if getattr(record, name, NO_REQUEST) is None
        }
        return super().format(logging.makeLogRecord({**record.__dict__, **missing}))


def _formatter(log_format: str, text_format: str) -> dict[str, Any]:
    if log_format == "json":
        return {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": JSON_FIELDS,
            "rename_fields": JSON_RENAMES,
            "timestamp": "time",
            "defaults": JSON_DEFAULTS,
            "reserved_attrs": JSON_SKIPPED,
        }
    return {"()": TextFormatter, "fmt": text_format, "defaults": {"request_id": NO_REQUEST}}


def server_config(log_format: str, level: str) -> dict[str, Any]:
    """dictConfig for the front: every record through one stderr handler, the access lines
    through one of their own (same stream, their fields spelled out in text)."""
    level = level.upper()
    handler = {
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
        "filters": ["request_id"],
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {
            "default": _formatter(log_format, TEXT_FORMAT),
            "access": _formatter(log_format, ACCESS_TEXT_FORMAT),
        },
        "handlers": {
            "default": {**handler, "formatter": "default"},
            "access": {**handler, "formatter": "access"},
        },
        "loggers": {
            "palm_serve.access": {"handlers": ["access"], "level": level, "propagate": False},
            # uvicorn's loggers carry handlers of their own when uvicorn configured them
            # (a server started before in this process): reset them to propagate here.
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
        },
        "root": {"handlers": ["default"], "level": level},
    }


def core_config(log_format: str, level: str) -> dict[str, Any]:
    """dictConfig for the engine core process: the same format; no request ids there (the
    engine knows requests by their engine ids)."""
    formatter = _formatter(log_format, TEXT_FORMAT)
    if formatter["()"] is TextFormatter:  # the core does not import the server's classes
        formatter = {**formatter, "()": "logging.Formatter"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
            }
        },
        "root": {"handlers": ["default"], "level": level.upper()},
    }


def configure(log_format: str, level: str) -> None:
    logging.config.dictConfig(server_config(log_format, level))
    logging.captureWarnings(True)  # warnings.warn() as log lines in the same format
