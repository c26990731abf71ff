"""ServerState: what every route needs, built once per app (app.state.palm)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from .chat_template import ChatTemplate
from .lifecycle import Lifecycle
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("palm_serve.server")


@dataclass
class ServerState:
    settings: Settings
    # The AsyncEngine (typed loosely: tests may pass a stand-in with the same interface).
    engine: Any
    model_name: str
    chat_template: ChatTemplate
    metrics: Metrics
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    _pending_aborts: set[asyncio.Task] = field(default_factory=set)

    def abort_soon(self, request_id: str) -> None:
        """Abort a request without awaiting here (we may be inside a cancelled scope).
        Closing the engine's iterator already aborts; this makes sure of it."""

        async def abort() -> None:
            try:
                await self.engine.abort(request_id)
            except Exception:  # an unknown or finished id: nothing to free
                log.debug("abort of %s failed", request_id, exc_info=True)

        task = asyncio.get_running_loop().create_task(abort())
        self._pending_aborts.add(task)
        task.add_done_callback(self._pending_aborts.discard)
