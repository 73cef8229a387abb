"""The OpenAI-compatible HTTP API over engines.scheduler (docs/serving.md).

Every endpoint checks its fields (server.protocol), submits one Request to the scheduler, which
steps in its own thread, and reads the tokens back with `Request.stream()`, so the event loop never
waits on the engine. A watcher task per request cancels it when the client goes away."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import ExportError
from engines.runtime import TextStream
from engines.scheduler import QueueFull, SamplingParams
from server.chat import ChatTemplate, TemplateError
from server.generation import ServingScheduler, StopStrings, TokenSink
from server.metrics import Metrics
from server.protocol import (MAX_BODY_BYTES, APIError, Generation, Limits, bad, check_context, parse_chat,
                             parse_completion)

log = logging.getLogger("dsv3.server")
DISCONNECT_POLL_S = 0.05
WARMUP_TIMEOUT_S = 600.0


@dataclass
class State:
    engine: Any
    scheduler: ServingScheduler
    limits: Limits
    metrics: Metrics
    chat_template: ChatTemplate | None
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    ready: threading.Event = field(default_factory=threading.Event)
    warmup_error: str | None = None


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _CountRequests:
    """ASGI middleware: every answer counted by endpoint and status (streams included)."""

    def __init__(self, app, state_ref: dict):
        self.app, self.state_ref = app, state_ref

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            state = self.state_ref.get("state")
            path = scope.get("path", "")
            endpoint = path if path in _ENDPOINTS else "other"
            if state is not None:
                state.metrics.requests.labels(endpoint, str(status["code"])).inc()


_ENDPOINTS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics"}


def create_app(engine, *, model_name: str, api_key: str | None = None, max_batch: int = 8,
               max_waiting: int = 256, prefill_chunk: int = 256) -> FastAPI:
    """The ASGI app serving `engine` (an engines.runtime.Engine over a buffered build)."""
    scheduler = ServingScheduler(engine, max_batch=max_batch, max_waiting=max_waiting, prefill_chunk=prefill_chunk)
    cfg = engine.config
    state = State(engine=engine, scheduler=scheduler, metrics=Metrics(scheduler, max_batch),
                  limits=Limits(vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len, model_name=model_name),
                  chat_template=ChatTemplate.from_build(engine.build_dir), api_key=api_key)
    state_ref = {"state": state}

    def warm_up() -> None:
        """One request through prefill and a decode step: /health answers 200 after it."""
        try:
            first = cfg.bos_token_id if cfg.bos_token_id is not None else 0
            req = scheduler.submit([first], SamplingParams(max_tokens=2, stop=frozenset()))
            if not req.wait(WARMUP_TIMEOUT_S) or req.finish_reason == "error":
                raise ExportError(req.error or "the warm-up request did not finish")
            state.ready.set()
            log.info("warm-up done: ready")
        except Exception as e:  # /health stays 503 and says why
            state.warmup_error = f"{type(e).__name__}: {e}"
            log.error("warm-up failed: %s", state.warmup_error)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        threading.Thread(target=warm_up, name="dsv3-warmup", daemon=True).start()
        try:
            yield
        finally:
            # uvicorn has already let the open requests finish (--graceful-timeout); stop stepping.
            for req in list(scheduler.waiting) + list(scheduler.prefilling) + list(scheduler.running):
                req.cancel()
            scheduler.stop()

    app = FastAPI(title="dsv3-export", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.dsv3 = state
    app.add_middleware(_CountRequests, state_ref=state_ref)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}},
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"error": {"message": f"internal error: {type(exc).__name__}: {exc}",
                                       "type": "server_error", "param": None, "code": None}}, status_code=500)

    def check_auth(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != state.api_key:
            raise APIError(401, "Incorrect or missing API key: send the header Authorization: Bearer <key>",
                           None, type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def check_ready() -> None:
        if not state.ready.is_set():
            raise APIError(503, "the model is still loading", None, type="server_error",
                           headers={"Retry-After": "1"})

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise bad("invalid Content-Length header", None) from None
            if declared > MAX_BODY_BYTES:
                raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes", None)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes", None)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}", None) from None

    # ---- endpoints --------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if state.ready.is_set():
            return {"status": "ok"}
        status = "error" if state.warmup_error else "loading"
        return JSONResponse({"status": status, "error": state.warmup_error}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check_auth(request)
        except APIError as e:
            return _error(e)
        return {"object": "list", "data": [{"id": state.limits.model_name, "object": "model", "created": state.created,
                                            "owned_by": "dsv3-export", "max_model_len": state.limits.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            check_auth(request)
            check_ready()
            g = parse_completion(await read_json(request), state.limits)
            if g.prompt_ids is None:
                g.prompt_ids = tokenize(g.prompt_text, add_bos=True, param="prompt")
            g.max_tokens = check_context(g, len(g.prompt_ids), state.limits, prompt_param="prompt")
            return await run(request, g, chat=False)
        except APIError as e:
            return _error(e)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            check_auth(request)
            check_ready()
            g = parse_chat(await read_json(request), state.limits)
            if state.chat_template is None:
                raise bad("this build has no chat template (tokenizer_config.json with chat_template); "
                          "use /v1/completions", "messages")
            try:
                g.prompt_text = state.chat_template.render(g.messages, add_generation_prompt=True)
            except TemplateError as e:
                raise bad(str(e), "messages") from None
            # The template writes the special tokens itself (transformers: add_special_tokens=False).
            g.prompt_ids = tokenize(g.prompt_text, add_bos=False, param="messages")
            g.max_tokens = check_context(g, len(g.prompt_ids), state.limits, prompt_param="messages")
            return await run(request, g, chat=True)
        except APIError as e:
            return _error(e)

    # ---- the generation behind both ---------------------------------------------------------------
    def tokenize(text: str, *, add_bos: bool, param: str) -> list[int]:
        if state.engine.tokenizer is None:
            raise bad("this build has no tokenizer.json: send the prompt as a list of token ids", param)
        return state.engine.tokenize(text, add_bos=add_bos)

    def submit(g: Generation, sink: TokenSink):
        stops = set(g.stop_token_ids) if g.ignore_eos else state.engine.stop_ids(g.stop_token_ids)
        params = SamplingParams(max_tokens=g.max_tokens, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                                seed=g.seed, stop=frozenset(stops))
        try:
            req = scheduler.submit(g.prompt_ids, params, on_token=sink)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}", None, type="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        except ExportError as e:
            text = str(e)
            param = ("max_tokens" if "max_tokens" in text else "temperature" if "temperature" in text
                     else "top_p" if "top_p" in text else "top_k" if "top_k" in text else "prompt")
            raise bad(text, param) from None
        state.metrics.prompt_tokens.inc(len(g.prompt_ids))
        return req, params.stop

    async def watch(http_request: Request, req) -> None:
        """Cancel `req` when its client disconnects (the scheduler frees the slot at its next step)."""
        try:
            while not req.finished:
                if await http_request.is_disconnected():
                    req.cancel()
                    return
                await asyncio.sleep(DISCONNECT_POLL_S)
        except Exception:  # the connection is gone in some other way
            req.cancel()

    def finished(req, completion_tokens: int, reason: str) -> None:
        m = state.metrics
        m.completion_tokens.inc(completion_tokens)
        m.finished.labels(reason).inc()
        if req.first_token_at is not None:
            m.ttft.observe(req.first_token_at - req.submitted)

    async def run(http_request: Request, g: Generation, *, chat: bool):
        sink = TokenSink(g.logprobs, on_gap=state.metrics.itl.observe)
        req, stop_ids = submit(g, sink)
        tokenizer = state.engine.tokenizer
        text_stream = TextStream(tokenizer) if tokenizer is not None else None
        stops = StopStrings(g.stop)
        created = int(time.time())
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        prompt_len = len(g.prompt_ids)
        echo_text = ""
        if g.echo and not chat:
            echo_text = g.prompt_text if g.prompt_text is not None else (state.engine.decode(g.prompt_ids) or "")

        def piece_of(token: int) -> tuple[str, bool]:
            """The text one token adds (its stop token adds none) through the stop strings."""
            if text_stream is None or token in stop_ids:
                return "", stops.stopped
            return stops.push(text_stream.push(token))

        def tail() -> str:
            if text_stream is None or stops.stopped:
                return ""
            return stops.push(text_stream.flush())[0] + stops.finish()

        def reason_of() -> str:
            if stops.stopped:
                return "stop"
            return req.finish_reason or "length"

        def usage(n: int) -> dict[str, int]:
            return {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}

        watcher = asyncio.create_task(watch(http_request, req))

        if g.stream:
            async def events():
                count = 0
                done = False
                try:
                    if chat:
                        yield _sse(chunk(rid, created, chat, {"role": "assistant", "content": ""}, None, []))
                    elif echo_text:
                        yield _sse(chunk(rid, created, chat, echo_text, None, []))
                    async for token in req.stream():
                        if stops.stopped:
                            break
                        count += 1
                        text, stopped = piece_of(token)
                        lp = None
                        if g.logprobs is not None:
                            await entries_ready(sink, count)
                            lp = logprobs_of(sink, [token], count - 1, chat)
                        yield _sse(chunk(rid, created, chat, delta(text, chat), None, [token], lp))
                        if stopped:
                            req.cancel()  # a stop string: the rest is not wanted
                            break
                    if req.finish_reason == "error":
                        yield _sse(APIError(500, f"generation failed: {req.error}", None, type="server_error").body())
                        finished(req, count, "error")
                        done = True
                        yield "data: [DONE]\n\n"
                        return
                    if req.finish_reason == "cancelled" and not stops.stopped:
                        finished(req, count, "cancelled")
                        done = True
                        return  # the client is gone
                    reason = reason_of()
                    yield _sse(chunk(rid, created, chat, delta(tail(), chat), reason, []))
                    if g.include_usage:
                        yield _sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                    "created": created, "model": state.limits.model_name, "choices": [],
                                    "usage": usage(count)})
                    finished(req, count, reason)
                    done = True
                    yield "data: [DONE]\n\n"
                finally:
                    watcher.cancel()
                    if not req.finished:
                        req.cancel()
                    if not done:
                        finished(req, count, "cancelled")

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        # not streamed: collect, then answer
        parts, tokens = [], []
        try:
            async for token in req.stream():
                tokens.append(token)
                text, stopped = piece_of(token)
                parts.append(text)
                if stopped:
                    req.cancel()
                    break
        finally:
            watcher.cancel()
            if not req.finished and not stops.stopped:
                req.cancel()
        if req.finish_reason == "error":
            finished(req, len(tokens), "error")
            raise APIError(500, f"generation failed: {req.error}", None, type="server_error")
        if req.finish_reason == "cancelled" and not stops.stopped:
            finished(req, len(tokens), "cancelled")
            return Response(status_code=499)  # the client is gone; nobody reads this
        parts.append(tail())
        text = "".join(parts)
        reason = reason_of()
        finished(req, len(tokens), reason)
        lp = None
        if g.logprobs is not None:
            await entries_ready(sink, len(tokens))
            lp = logprobs_of(sink, tokens, 0, chat, base=len(echo_text))
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                      "finish_reason": reason, "token_ids": tokens}
        else:
            choice = {"index": 0, "text": echo_text + text, "logprobs": lp, "finish_reason": reason,
                      "token_ids": tokens}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": state.limits.model_name, "choices": [choice], "usage": usage(len(tokens))}

    async def entries_ready(sink: TokenSink, n: int, timeout: float = 5.0) -> None:
        """The sink records a token's log-probability just after the token is queued (same thread)."""
        deadline = time.perf_counter() + timeout
        while len(sink.entries) < n and time.perf_counter() < deadline:
            await asyncio.sleep(0.001)

    def delta(text: str, chat: bool):
        return {"content": text} if chat else text

    def chunk(rid, created, chat, payload, reason, token_ids=None, lp=None) -> dict:
        if chat:
            choice = {"index": 0, "delta": payload, "logprobs": lp, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": payload, "logprobs": lp, "finish_reason": reason}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": state.limits.model_name, "choices": [choice]}

    def token_text(token: int) -> str:
        return state.engine.decode([token]) or ""

    def logprobs_of(sink: TokenSink, tokens: list[int], start: int, chat: bool, base: int = 0):
        entries = sink.entries[start:start + len(tokens)]
        if chat:
            content = []
            for tok, (lp, top) in zip(tokens, entries):
                s = token_text(tok)
                content.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                                "top_logprobs": [{"token": token_text(t), "logprob": v,
                                                  "bytes": list(token_text(t).encode())} for t, v in top]})
            return {"content": content}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = base
        for tok, (lp, top) in zip(tokens, entries):
            s = token_text(tok)
            out["tokens"].append(s)
            out["token_logprobs"].append(lp)
            top_map: dict[str, float] = {}
            for t, v in top:
                top_map.setdefault(token_text(t), v)
            out["top_logprobs"].append(top_map)
            out["text_offset"].append(offset)
            offset += len(s)
        return out

    return app
