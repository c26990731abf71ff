"""create_app(settings, engine) -> FastAPI: routes, middlewares, error handlers, metrics,
and a lifespan that starts the engine and stops it at shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from ..engine.async_engine import AsyncEngine
from ..engine.heap import freeze_startup_heap
from . import (
    routes_chat,
    routes_completions,
    routes_generate,
    routes_models,
    routes_ops,
    routes_playground,
)
from .access_log import AccessLogMiddleware
from .chat_template import ChatTemplate
from .errors import install_error_handlers
from .lifecycle import Lifecycle
from .metrics import Metrics
from .middleware import APIKeyMiddleware, HTTPMetricsMiddleware, UnhandledErrorMiddleware
from .openapi import served_schema
from .request_body import RequestBodyMiddleware
from .request_context import REQUEST_ID_HEADER
from .settings import Settings
from .state import ServerState


def create_app(
    settings: Settings,
    engine: AsyncEngine,
    lifecycle: Lifecycle | None = None,
    freeze_heap: bool = False,
) -> FastAPI:
    """`engine` is an AsyncEngine, not yet started: the app's lifespan starts and stops it.
    freeze_heap: once the engine serves, freeze the process's heap (engine/heap.py); for a
    process that does nothing but serve, not for one that embeds the app (tests)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        if freeze_heap:
            freeze_startup_heap()
        try:
            yield
        finally:
            await engine.shutdown()

    # No trailing-slash redirects: Starlette builds their Location from the Host header.
    app = FastAPI(title="palm-serve", version="0.1.0", lifespan=lifespan, redirect_slashes=False)
    app.state.palm = ServerState(
        settings=settings,
        engine=engine,
        model_name=settings.model_name(),
        chat_template=ChatTemplate.load(settings.chat_template),
        metrics=Metrics(
            engine.stats, lambda: engine.num_restarts, lambda: engine.info.weight_bytes
        ),
        lifecycle=lifecycle or Lifecycle(),
    )
    for routes in (routes_generate, routes_completions, routes_chat, routes_models, routes_ops):
        app.include_router(routes.router)
    if settings.playground:
        app.include_router(routes_playground.router)
    install_error_handlers(app)
    _add_middlewares(app, settings)
    vocab_size = engine.info.model_config.vocab_size
    app.openapi = lambda: served_schema(app, settings, vocab_size)  # type: ignore[method-assign]
    return app


def _add_middlewares(app: FastAPI, settings: Settings) -> None:
    # Added innermost first: CORS (outermost) -> HTTP metrics -> request id and access log
    # -> unexpected errors -> request body -> API key.
    if settings.api_key is not None:
        playground = settings.playground
        app.add_middleware(
            APIKeyMiddleware,
            api_key=settings.api_key.get_secret_value(),
            open_paths=(routes_playground.PAGE_PATH,) if playground else (),
            open_prefixes=(routes_playground.ASSET_PREFIX,) if playground else (),
        )
    app.add_middleware(
        RequestBodyMiddleware,
        max_bytes=settings.max_request_bytes,
        read_timeout=settings.body_read_timeout,
        routes=app.routes,
    )
    app.add_middleware(UnhandledErrorMiddleware, log_messages=settings.log_requests)
    app.add_middleware(AccessLogMiddleware, routes=app.routes)
    app.add_middleware(HTTPMetricsMiddleware, metrics=app.state.palm.metrics, routes=app.routes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", REQUEST_ID_HEADER],
            expose_headers=[REQUEST_ID_HEADER],
        )
