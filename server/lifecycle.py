"""Admission and graceful drain.

Lifecycle counts the generation requests in flight and refuses new ones while draining.
DrainingServer hooks uvicorn's own signal handling: the first SIGTERM or SIGINT does not
stop the server at once. /ready turns 503 at once (the replica is withdrawn), but new
requests are still admitted for the drain delay, so that a load balancer health-checking
/ready stops sending before this replica refuses anything; then the drain starts (new
generation requests get 503), and the server exits once the requests in flight have
finished, or the drain timeout has passed, then shuts down as usual (lifespan: the engine
and its core process stop) and exits 0. A second signal stops it without waiting."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn

log = logging.getLogger("palm_serve.server")


class Lifecycle:
    def __init__(self) -> None:
        self.withdrawn = False  # /ready answers 503: load balancers should stop sending
        self.draining = False  # new generation requests are refused
        self.inflight = 0

    def withdraw(self) -> None:
        self.withdrawn = True

    def start_drain(self) -> None:
        self.withdrawn = True
        self.draining = True

    def admit(self) -> Ticket:
        self.inflight += 1
        return Ticket(self)


class Ticket:
    """One admitted request; release() (idempotent) when its response is over."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._lifecycle.inflight -= 1


class DrainingServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        lifecycle: Lifecycle,
        drain_timeout: float,
        on_drain_timeout: Callable[[], Awaitable[None]] | None = None,
        drain_delay: float = 0.0,
    ) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain_timeout = drain_timeout
        self.drain_delay = drain_delay
        # Called when requests are still running at the deadline: stopping the engine ends
        # them with finish_reason "abort", so their streams close cleanly instead of being cut.
        self.on_drain_timeout = on_drain_timeout
        self.drain_start: float | None = None
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the signal handler: only set flags; on_tick (event loop) acts on them.
        if sig in (signal.SIGTERM, signal.SIGINT) and self.drain_start is None:
            self.drain_start = time.monotonic() + self.drain_delay
            self.drain_deadline = self.drain_start + self.drain_timeout
            if self.drain_delay > 0:
                self.lifecycle.withdraw()
            else:
                self.lifecycle.start_drain()
            # Not appended to _captured_signals: uvicorn would re-raise the signal after a
            # clean shutdown and the exit code would be 143 (130) instead of 0.
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_start is not None and not self.lifecycle.draining:
            if time.monotonic() >= self.drain_start:
                log.info("drain delay over: refusing new requests")
                self.lifecycle.start_drain()
        if self.lifecycle.draining and self.drain_deadline is not None and not self.should_exit:
            timed_out = time.monotonic() >= self.drain_deadline
            left = self.lifecycle.inflight
            if left == 0 or timed_out:
                if left:
                    log.warning("drain timed out with %d request(s) running: aborting", left)
                    if self.on_drain_timeout is not None:
                        await self.on_drain_timeout()
                else:
                    log.info("drain complete; shutting down")
                self.should_exit = True
        return await super().on_tick(counter)
