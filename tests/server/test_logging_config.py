"""The log formats as built from logging_config's dictConfig entries (without applying them
to this process's loggers), the request id filter, and the traceback without messages that
unexpected errors are logged with when --log-requests is off."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.config
import traceback

import pytest

from palm_serve.server import logging_config
from palm_serve.server.middleware import UnhandledErrorMiddleware, without_messages
from palm_serve.server.request_context import RequestContext, serving

SECRET = "MARKER-secret-prompt"


def _formatter(log_format: str, name: str) -> logging.Formatter:
    config = logging_config.server_config(log_format, "info")["formatters"][name]
    kwargs = {k: v for k, v in config.items() if k != "()"}
    factory = config["()"]
    if isinstance(factory, str):
        factory = logging.config.BaseConfigurator({}).resolve(factory)
    return factory(**kwargs)


def _record(name: str = "palm_serve.access", **extra) -> logging.LogRecord:
    record = logging.makeLogRecord(
        {"name": name, "levelname": "INFO", "levelno": 20, "msg": "POST /v1/generate 200"}
    )
    record.__dict__.update(extra)
    with serving(RequestContext("req-1")):
        logging_config.RequestIdFilter().filter(record)
    return record


ACCESS = dict(
    method="POST",
    route="/v1/generate",
    status=200,
    prompt_tokens=5,
    completion_tokens=4,
    ttft_s=None,
    duration_s=0.5,
    finish_reason="length",
    client="127.0.0.1:5000",
)


def test_a_json_line_leads_with_time_and_request_id_then_the_fields() -> None:
    line = json.loads(_formatter("json", "access").format(_record(**ACCESS, color_message="x")))
    assert list(line)[:5] == ["time", "request_id", "level", "logger", "message"]
    assert line["request_id"] == "req-1" and line["time"].endswith("+00:00")
    assert {k: line[k] for k in ACCESS} == ACCESS
    assert "color_message" not in line


def test_a_text_access_line_spells_out_the_fields() -> None:
    text = _formatter("text", "access").format(_record(**ACCESS))
    assert text.endswith(
        "INFO palm_serve.access [req-1] POST /v1/generate 200 prompt_tokens=5 "
        "completion_tokens=4 ttft_s=- duration_s=0.5 finish_reason=length client=127.0.0.1:5000"
    )


def test_a_line_outside_any_request_has_no_id() -> None:
    record = logging.makeLogRecord({"name": "uvicorn.error", "msg": "started"})
    logging_config.RequestIdFilter().filter(record)
    assert "[-] started" in _formatter("text", "default").format(record)
    assert json.loads(_formatter("json", "default").format(record))["request_id"] is None


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_core_process_config_names_no_server_class(log_format: str) -> None:
    """The engine core applies it: it must not make the engine import the server."""
    config = logging_config.core_config(log_format, "info")
    factories = [f["()"] for f in config["formatters"].values()]
    assert all(isinstance(f, str) and not f.startswith("palm_serve") for f in factories)


def test_an_unexpected_error_is_logged_without_its_messages() -> None:
    def parse() -> None:
        raise KeyError(SECRET)

    try:
        try:
            parse()
        except KeyError as exc:
            raise ValueError(f"bad input {SECRET}") from exc
    except ValueError as exc:
        text = without_messages(exc)
    assert SECRET not in text
    assert "builtins.KeyError" in text and "builtins.ValueError" in text
    assert text.index("KeyError") < text.index("ValueError")  # the cause first, as Python
    assert "in parse" in text  # the frames are there


@pytest.mark.parametrize("log_messages", [False, True])
async def test_the_500_path_logs_the_message_only_with_log_requests(log_messages, caplog) -> None:
    async def failing_app(scope, receive, send) -> None:
        raise ValueError(f"cannot parse {SECRET}")

    app = UnhandledErrorMiddleware(failing_app, log_messages=log_messages)
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/generate", "headers": []}
    with caplog.at_level(logging.ERROR, logger="palm_serve.server"):
        await app(scope, None, send)
    assert sent[0]["status"] == 500
    assert "ValueError" in caplog.text
    assert (SECRET in caplog.text) is log_messages


NOT_LOGGED = " (message not logged: --log-requests is off)"
BETWEEN = "\nwhile handling the above, another exception:\n"


class ParseFailure(Exception):
    """Not a builtin: its name in the log carries this module's."""


@pytest.mark.parametrize("explicit", [True, False], ids=["raise-from", "raised-while-handling"])
def test_each_exception_of_the_chain_gets_its_frames_and_its_name(explicit: bool) -> None:
    """The line an operator reads: one traceback per exception, the cause first, each
    ending in the exception's qualified name instead of its message."""

    def parse() -> None:
        raise ParseFailure(SECRET)

    try:
        try:
            parse()
        except ParseFailure as exc:
            if explicit:
                raise ValueError(SECRET) from exc
            raise ValueError(SECRET)  # noqa: B904 - the implicit chain (__context__)
    except ValueError as exc:
        raised = exc
        text = without_messages(exc)
    first, second = text.split(BETWEEN)
    cause = f"{ParseFailure.__module__}.ParseFailure"
    earlier = raised.__cause__ if explicit else raised.__context__
    assert earlier is not None
    for part, e, name in ((first, earlier, cause), (second, raised, "builtins.ValueError")):
        # The oracle: the standard library's own traceback of that one exception, with the
        # line that carries its message swapped for the name.
        whole = "".join(traceback.format_exception(type(e), e, e.__traceback__, chain=False))
        message_line = "".join(traceback.format_exception_only(type(e), e))
        assert whole.endswith(message_line)
        assert part == whole.removesuffix(message_line) + name + NOT_LOGGED
    assert "in parse" in first and "in parse" not in second
    assert SECRET not in text


def _run_unhandled(app, log_messages: bool, caplog) -> list[dict]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "PUT", "path": "/v1/models", "headers": []}
    with caplog.at_level(logging.ERROR, logger="palm_serve.server"):
        asyncio.run(UnhandledErrorMiddleware(app, log_messages=log_messages)(scope, None, send))
    return sent


def test_the_500_and_its_log_line_exactly(caplog) -> None:
    async def failing_app(scope, receive, send) -> None:
        raise ValueError(SECRET)

    sent = _run_unhandled(failing_app, False, caplog)
    length = str(len(sent[1]["body"])).encode()
    assert sent[0] == {
        "type": "http.response.start",
        "status": 500,
        "headers": [(b"content-type", b"application/json"), (b"content-length", length)],
    }
    assert json.loads(sent[1]["body"]) == {
        "error": {
            "message": "internal error",
            "type": "server_error",
            "code": "internal_error",
            "param": None,
        }
    }
    assert len(sent) == 2
    [record] = caplog.records
    # The route the request was aimed at (none matched here: the middleware has no routes).
    assert record.getMessage().startswith("unhandled error on PUT unmatched\nTraceback")
    assert record.exc_info is None  # frames and names only, written into the message
    caplog.clear()
    _run_unhandled(failing_app, True, caplog)
    [record] = caplog.records
    assert record.getMessage() == "unhandled error on PUT unmatched"
    assert record.exc_info is not None and record.exc_info[1].args == (SECRET,)


def test_an_error_after_the_answer_started_is_logged_not_answered_twice(caplog) -> None:
    async def fails_mid_answer(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise ValueError(SECRET)

    sent = _run_unhandled(fails_mid_answer, False, caplog)
    assert sent == [{"type": "http.response.start", "status": 200, "headers": []}]
    assert len(caplog.records) == 1 and "ValueError" in caplog.text


def test_what_is_not_http_passes_through_untouched() -> None:
    seen: list[tuple] = []

    async def app(scope, receive, send) -> None:
        seen.append((scope, receive, send))
        raise ValueError("a lifespan error is the server's to report")

    scope = {"type": "lifespan"}
    with pytest.raises(ValueError, match="lifespan"):
        asyncio.run(UnhandledErrorMiddleware(app)(scope, "receive", "send"))
    assert seen == [(scope, "receive", "send")]


def test_by_default_the_500_path_logs_no_message(caplog) -> None:
    async def failing_app(scope, receive, send) -> None:
        raise ValueError(SECRET)

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
    with caplog.at_level(logging.ERROR, logger="palm_serve.server"):
        asyncio.run(UnhandledErrorMiddleware(failing_app)(scope, None, send))
    assert sent[0]["status"] == 500 and "ValueError" in caplog.text
    assert SECRET not in caplog.text
