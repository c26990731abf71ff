"""Operations: GET /health (alive), GET /ready (serving), GET /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .responses import Status
from .routes_common import get_state

router = APIRouter()


@router.get(
    "/health",
    response_model=Status,
    responses={503: {"model": Status}},
    summary="Liveness: the process answers and its engine is not dead for good",
)
async def health(request: Request) -> Response:
    # 503 only once the engine core died and no restart is left: a liveness probe should
    # then replace the whole server. A core that is restarting is not a reason to.
    if get_state(request).engine.status == "dead":
        return JSONResponse({"status": "engine dead"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get(
    "/ready",
    response_model=Status,
    responses={503: {"model": Status}},
    summary="Readiness: model loaded, engine running, not draining",
)
async def ready(request: Request) -> Response:
    state = get_state(request)
    if state.lifecycle.withdrawn:
        return JSONResponse({"status": "draining"}, status_code=503)
    status = state.engine.status
    if status != "ready":
        text = {"restarting": "engine restarting", "starting": "engine starting"}
        return JSONResponse({"status": text.get(status, "engine stopped")}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics (text format)",
    responses={
        200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}
    },
)
async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
