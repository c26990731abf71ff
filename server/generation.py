"""The server's side of one generation: tokenizing a prompt (once, however many requests
share it), admission (drain, dead engine, full queue), validation through the engine,
streaming outputs with metrics, and the non-streaming wait that notices a client that
went away. Closing a request's stream is the one way a request is aborted."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from ..engine.errors import EngineDeadError, InvalidRequestError
from ..engine.messages import EngineCoreRequest
from ..engine.outputs import RequestOutput, TokenLogprob
from ..engine.sampling_params import SamplingParams
from .errors import APIError, bad_request, error_body, from_engine_error, unavailable
from .lifecycle import Ticket
from .request_context import RequestContext, request_context
from .sse import SSEResponse, sse_event
from .state import ServerState

# User text (prompts, outputs) is logged only with --log-requests, at info.
request_log = logging.getLogger("palm_serve.requests")

# One request's outputs; closing it early aborts the request.
OutputStream = AsyncGenerator[RequestOutput, None]

DISCONNECT_POLL_SECONDS = 0.2
RETRY_AFTER_SECONDS = 1


def make_params(**kwargs: Any) -> SamplingParams:
    """SamplingParams, its own checks turned into a 400 naming the field."""
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise bad_request(str(exc), str(exc).split(" ", 1)[0]) from None


def admit(state: ServerState, num_seqs: int, fan_out: str = "") -> list[Ticket]:
    """One ticket per sequence a request runs (prompts x n), all or none. The server holds
    at most max_num_seqs running plus max_queue waiting sequences: a request that needs more
    can never pass (400, saying why); one that does not fit now is a 429 (retry later).
    Draining or a dead engine: 503. fan_out names what multiplied the sequences."""
    settings = state.settings
    capacity = settings.max_num_seqs + settings.max_queue
    if num_seqs > capacity:
        raise bad_request(
            f"n: this request needs {num_seqs} sequences{fan_out}; this server holds at most "
            f"{capacity} at once (max_num_seqs {settings.max_num_seqs} running + max_queue "
            f"{settings.max_queue} waiting)",
            "n",
        )
    if state.lifecycle.draining:
        raise unavailable("the server is shutting down; retry on another replica")
    status = state.engine.status
    if status == "restarting":
        raise APIError(
            503,
            "the engine core is restarting; retry shortly",
            type="service_unavailable",
            code="engine_restarting",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    if status != "ready":
        raise unavailable("the engine has stopped; no request can be served")
    inflight = state.lifecycle.inflight
    if inflight + num_seqs > capacity:
        raise APIError(
            429,
            f"too many requests: {inflight} sequences are running or waiting and this request "
            f"needs {num_seqs} more (room for {capacity}); retry later",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    return [state.lifecycle.admit() for _ in range(num_seqs)]


def tokenize(state: ServerState, prompt: str | list[int], param: str = "prompt") -> list[int]:
    """The prompt's token ids (its one encode), or a 400 naming the field it came from.
    They count once in the access line's prompt tokens, however many choices share them."""
    if state.settings.log_requests:
        request_log.info("%s: %r", param, prompt)
    try:
        ids = state.engine.tokenize(prompt, param)
    except InvalidRequestError as exc:
        raise from_engine_error(exc) from None
    request_context().prompt_tokens += len(ids)
    return ids


@dataclass
class Outcome:
    """How a request ended when its own outputs cannot say (the client stopped reading).

    A streamed request is held: its finish is counted when its response ends (settle), not
    when the engine's outputs end, since outputs the engine finished may still be queued
    behind a client that stopped reading, and the response then ends as stalled."""

    stalled: bool = False
    held: bool = False
    settled: bool = False
    pending: Callable[[], None] | None = None

    def finish(self, count: Callable[[], None]) -> None:
        if self.held and not self.settled:
            self.pending = count
        else:
            count()

    def settle(self) -> None:
        self.settled = True
        pending, self.pending = self.pending, None
        if pending is not None:
            pending()


async def outputs(
    state: ServerState,
    request: EngineCoreRequest,
    ticket: Ticket,
    outcome: Outcome,
    context: RequestContext,
) -> OutputStream:
    """The engine's outputs for one request. Closing the stream early (aclose, cancellation:
    a client that left) aborts the request, so its KV blocks return to the pool."""
    tracker, reason = state.metrics.track(), "abort"
    logged_text: list[str] | None = [] if state.settings.log_requests else None
    try:
        async with aclosing(state.engine.generate(request)) as stream:
            async for out in stream:
                tracker.on_output(out)
                context.on_tokens(len(out.new_token_ids))
                if logged_text is not None:
                    logged_text.append(out.new_text)
                if out.finished:
                    reason = out.finish_reason or "stop"
                yield out
    finally:
        ticket.release()

        def count() -> None:
            final = "stalled" if outcome.stalled else reason
            tracker.finish(final, len(request.prompt_token_ids))
            context.finish_reasons.append(final)
            if logged_text is not None:
                request_log.info("output of %s: %r", request.request_id, "".join(logged_text))

        outcome.finish(count)


@dataclass
class Started:
    """One admitted, validated request whose outputs are ready to iterate."""

    request: EngineCoreRequest
    stream: OutputStream
    ticket: Ticket
    outcome: Outcome
    # The `id` of the response: the route's prefix and the HTTP request's id (X-Request-Id).
    response_id: str

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_token_ids


def start(
    state: ServerState, prompt_ids: list[int], params: SamplingParams, prefix: str, ticket: Ticket
) -> Started:
    """Validate a request admitted with `ticket`. The caller releases its tickets
    (idempotent) when the response is over, or at once if any of its requests is refused."""
    context = request_context()
    try:
        request = state.engine.make_request(prompt_ids, params, context.engine_request_id(prefix))
    except (InvalidRequestError, EngineDeadError) as exc:
        raise from_engine_error(exc) from None
    outcome = Outcome()
    stream = outputs(state, request, ticket, outcome, context)
    return Started(request, stream, ticket, outcome, context.response_id(prefix))


def release_all(tickets: list[Ticket]) -> None:
    for ticket in tickets:
        ticket.release()


def stream_response(
    state: ServerState, events: AsyncIterator[bytes], started: list[Started], tickets: list[Ticket]
) -> SSEResponse:
    """The SSE response of started requests, which settles their finishes when it ends:
    stalled, for every one of them, when the client stopped reading."""
    for s in started:
        s.outcome.held = True

    def stalled() -> None:
        for s in started:
            s.outcome.stalled = True

    def ended() -> None:
        release_all(tickets)
        for s in started:
            s.outcome.settle()

    return SSEResponse(
        events, ended, stall_timeout=state.settings.stream_stall_timeout, on_stall=stalled
    )


@dataclass
class Collected:
    """A whole non-streaming result, accumulated from the outputs."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        self.token_ids += out.new_token_ids
        self.logprobs += out.logprobs or []
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
            self.error = out.error


async def collect(stream: OutputStream, request: Request) -> Collected:
    """Wait for the whole result, watching for the client leaving: then abort (499-style)."""
    result = Collected()

    async def drain() -> None:
        async with aclosing(stream) as s:
            async for out in s:
                result.add(out)

    task = asyncio.ensure_future(drain())
    while not task.done():
        await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
            raise APIError(499, "client closed the request", code="client_closed")
    task.result()  # re-raises the engine's InvalidRequestError / EngineDeadError
    if result.finish_reason == "error":
        raise engine_failure(result.error)
    return result


def engine_failure(error: str | None) -> APIError:
    """A request the engine ended with finish_reason "error": its core failed or died while
    running it (the front validated it, so nothing else ends a request so). 503: the server
    is not serving right now; the same request may succeed once the core is back."""
    return APIError(
        503,
        f"the engine failed this request: {error or 'no reason given'}",
        type="service_unavailable",
        code="engine_error",
    )


def failure_event(out: RequestOutput) -> bytes | None:
    """After a stream's last event: an error event saying why the engine failed it."""
    if out.finish_reason != "error":
        return None
    err = engine_failure(out.error)
    return sse_event(error_body(err.message, err.type, err.code))


async def collect_many(streams: list[OutputStream], request: Request) -> list[Collected]:
    """Several choices (n > 1, several prompts) concurrently; one failure aborts the rest."""
    tasks = [asyncio.ensure_future(collect(s, request)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def merge(
    streams: list[OutputStream],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several streams as outputs arrive: (stream index, output)."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as s:
            async for out in s:
                yield 0, out
        return
    # Bounded: a consumer that stops reading stops the pumps too, so the outputs wait
    # unread in the engine's queues, where ending the response drops them.
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))

    async def pump(i: int, stream: OutputStream) -> None:
        # Nothing is queued once cancelled: the consumer has gone and the queue may be full,
        # where a put would keep this task waiting for ever.
        try:
            async with aclosing(stream) as s:
                async for out in s:
                    await queue.put((i, out, None))
        except Exception as exc:  # handed to the consumer, raised there
            await queue.put((i, None, exc))
            return
        await queue.put((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            i, out, exc = await queue.get()
            if exc is not None:
                raise exc
            if out is None:
                open_streams -= 1
            else:
                yield i, out
    finally:
        for task in tasks:
            task.cancel()
