"""The OpenAI-compatible HTTP API over engines.scheduler (docs/serving.md).

Every endpoint (server.routes) checks its fields (server.protocol), submits one Request to the
scheduler, which steps in its own thread, and reads the tokens back with `Request.stream()`
(server.streaming), so the event loop never waits on the engine. A watcher task per request cancels
it when the client goes away. The shared State lives in `app.state.dsv3`."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv3_export.core.errors import ExportError
from dsv3_export.engines.sampling import SamplingParams
from dsv3_export.engines.scheduler import Scheduler
from dsv3_export.server.chat import ChatTemplate
from dsv3_export.server.metrics import Metrics
from dsv3_export.server.protocol import Limits, check_api_key
from dsv3_export.server.routes import ENDPOINTS, router
from dsv3_export.server.state import State

log = logging.getLogger("dsv3.server")
WARMUP_TIMEOUT_S = 600.0


access_log = logging.getLogger("dsv3.server.access")


class _CountRequests:
    """ASGI middleware: every answer counted by endpoint and status (streams included), and logged
    as one access line when it ends, uvicorn-style, with its tokens (generations put them in
    scope["state"]["dsv3_tokens"]) and its latency."""

    def __init__(self, app, state_ref: dict):
        self.app, self.state_ref = app, state_ref

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}
        started = time.perf_counter()

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            state = self.state_ref.get("state")
            path = scope.get("path", "")
            endpoint = path if path in ENDPOINTS else "other"
            if state is not None:
                state.metrics.requests.labels(endpoint, str(status["code"])).inc()
            _log_access(scope, status["code"], time.perf_counter() - started)


def _log_access(scope, status: int, seconds: float) -> None:
    if scope.get("path") in ("/health", "/metrics"):  # polled by machines: not worth a line each
        return
    client = scope.get("client")
    who = f"{client[0]}:{client[1]}" if client else "-"
    tokens = (scope.get("state") or {}).get("dsv3_tokens")
    extra = f" {tokens[0]}+{tokens[1]} tokens ({tokens[2]})" if tokens else ""
    access_log.info('%s - "%s %s" %d%s %.3f s', who, scope.get("method", "-"), scope.get("path", "-"), status, extra,
                    seconds)


def create_app(engine, *, model_name: str, api_key: str | None = None, max_batch: int = 8,
               max_waiting: int = 256, prefill_chunk: int = 256, client_timeout: float = 30.0) -> FastAPI:
    """The ASGI app serving `engine` (an engines.runtime.Engine over a buffered build)."""
    check_api_key(api_key)
    scheduler = Scheduler(engine, max_batch=max_batch, max_waiting=max_waiting, prefill_chunk=prefill_chunk)
    cfg = engine.config
    state = State(engine=engine, scheduler=scheduler, metrics=Metrics(scheduler, max_batch),
                  limits=Limits(vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len, model_name=model_name),
                  chat_template=ChatTemplate.from_build(engine.build_dir), api_key=api_key,
                  client_timeout=client_timeout)
    app = FastAPI(title="dsv3-export", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.dsv3 = state
    app.add_middleware(_CountRequests, state_ref={"state": state})
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(router)
    return app


def _warm_up(state: State) -> None:
    """One request through prefill and a decode step: /health answers 200 after it."""
    try:
        cfg = state.engine.config
        first = cfg.bos_token_id if cfg.bos_token_id is not None else 0
        req = state.scheduler.submit([first], SamplingParams(max_tokens=2, stop=frozenset()))
        if not req.wait(WARMUP_TIMEOUT_S) or req.finish_reason == "error":
            raise ExportError(req.error or "the warm-up request did not finish")
        state.ready.set()
        log.info("warm-up done: ready")
    except Exception as e:  # /health stays 503 and says why
        state.warmup_error = f"{type(e).__name__}: {e}"
        log.error("warm-up failed: %s", state.warmup_error)


@asynccontextmanager
async def _lifespan(app: FastAPI):
    scheduler = app.state.dsv3.scheduler
    scheduler.start()
    threading.Thread(target=_warm_up, args=(app.state.dsv3,), name="dsv3-warmup", daemon=True).start()
    try:
        yield
    finally:
        # uvicorn has already let the open requests finish (--graceful-timeout); stop stepping.
        scheduler.cancel_all()
        scheduler.stop()


async def _http_error(request: Request, exc: StarletteHTTPException):
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse({"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}},
                        status_code=exc.status_code)


async def _internal_error(request: Request, exc: Exception):
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse({"error": {"message": f"internal error: {type(exc).__name__}: {exc}",
                                   "type": "server_error", "param": None, "code": None}}, status_code=500)
