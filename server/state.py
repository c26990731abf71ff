"""ServerState: what every route needs, built once per app (app.state.palm)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engine.async_engine import AsyncEngine
from .chat_template import ChatTemplate
from .lifecycle import Lifecycle
from .metrics import Metrics
from .settings import Settings


@dataclass
class ServerState:
    settings: Settings
    engine: AsyncEngine
    model_name: str
    chat_template: ChatTemplate
    metrics: Metrics
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
