"""One generation behind /v1/completions and /v1/chat/completions: submit the checked Generation to
the scheduler, read its tokens back with `Request.stream()` through the stop strings, and answer as
server-sent events (`stream`) or one JSON body. A watcher task cancels the request when the client
goes away; every finished request is counted in the metrics once."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from dsv3_export.core.errors import ExportError
from dsv3_export.engines.runtime import TextStream
from dsv3_export.engines.scheduler import QueueFull, SamplingParams
from dsv3_export.engines.stop_strings import StopStrings
from dsv3_export.server.generation import TokenSink
from dsv3_export.server.protocol import APIError, Generation, bad
from dsv3_export.server.responses import chunk, delta, logprobs_of, sse
from dsv3_export.server.state import State

DISCONNECT_POLL_S = 0.05


@dataclass
class _Run:
    """One submitted generation and what its answer is written from."""

    state: State
    g: Generation
    chat: bool
    sink: TokenSink
    req: Any  # engines.scheduler.Request
    stop_ids: frozenset
    text_stream: TextStream | None
    stops: StopStrings
    created: int
    rid: str
    echo_text: str
    watcher: asyncio.Task | None = None

    def piece_of(self, token: int) -> tuple[str, bool]:
        """The text one token adds (its stop token adds none) through the stop strings."""
        if self.text_stream is None or token in self.stop_ids:
            return "", self.stops.stopped
        return self.stops.push(self.text_stream.push(token))

    def tail(self) -> str:
        if self.text_stream is None or self.stops.stopped:
            return ""
        return self.stops.push(self.text_stream.flush())[0] + self.stops.finish()

    def reason(self) -> str:
        if self.stops.stopped:
            return "stop"
        return self.req.finish_reason or "length"

    def usage(self, n: int) -> dict[str, int]:
        prompt_len = len(self.g.prompt_ids)
        return {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}

    def chunk(self, payload, reason, token_ids=None, lp=None) -> dict:
        return chunk(self.rid, self.created, self.state.limits.model_name, self.chat, payload, reason, token_ids, lp)

    def finished(self, completion_tokens: int, reason: str) -> None:
        m = self.state.metrics
        m.completion_tokens.inc(completion_tokens)
        m.finished.labels(reason).inc()
        if self.req.first_token_at is not None:
            m.ttft.observe(self.req.first_token_at - self.req.submitted)


async def run(state: State, http_request: Request, g: Generation, *, chat: bool):
    """Generate for the checked `g`: a StreamingResponse when `g.stream`, else the answer's JSON."""
    sink = TokenSink(g.logprobs, on_gap=state.metrics.itl.observe)
    req, stop_ids = submit(state, g, sink)
    tokenizer = state.engine.tokenizer
    echo_text = ""
    if g.echo and not chat:
        echo_text = g.prompt_text if g.prompt_text is not None else (state.engine.decode(g.prompt_ids) or "")
    r = _Run(state=state, g=g, chat=chat, sink=sink, req=req, stop_ids=stop_ids,
             text_stream=TextStream(tokenizer) if tokenizer is not None else None, stops=StopStrings(g.stop),
             created=int(time.time()), rid=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
             echo_text=echo_text)
    r.watcher = asyncio.create_task(watch(http_request, req))
    if g.stream:
        return StreamingResponse(events(r), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await collect(r)


def submit(state: State, g: Generation, sink: TokenSink):
    """The scheduler's Request for `g` and its stop token ids; a full queue answers 429."""
    stops = set(g.stop_token_ids) if g.ignore_eos else state.engine.stop_ids(g.stop_token_ids)
    params = SamplingParams(max_tokens=g.max_tokens, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                            seed=g.seed, stop=frozenset(stops))
    try:
        req = state.scheduler.submit(g.prompt_ids, params, on_token=sink)
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


async def entries_ready(sink: TokenSink, n: int, timeout: float = 5.0) -> None:
    """The sink records a token's log-probability just after the token is queued (same thread)."""
    deadline = time.perf_counter() + timeout
    while len(sink.entries) < n and time.perf_counter() < deadline:
        await asyncio.sleep(0.001)


async def events(r: _Run):
    """The server-sent events of a streamed answer, ending with [DONE] (none when the client left)."""
    req, g, chat = r.req, r.g, r.chat
    count = 0
    done = False
    try:
        if chat:
            yield sse(r.chunk({"role": "assistant", "content": ""}, None, []))
        elif r.echo_text:
            yield sse(r.chunk(r.echo_text, None, []))
        async for token in req.stream():
            if r.stops.stopped:
                break
            count += 1
            text, stopped = r.piece_of(token)
            lp = None
            if g.logprobs is not None:
                await entries_ready(r.sink, count)
                lp = logprobs_of(r.state.engine, r.sink, [token], count - 1, chat)
            yield sse(r.chunk(delta(text, chat), None, [token], lp))
            if stopped:
                req.cancel()  # a stop string: the rest is not wanted
                break
        if req.finish_reason == "error":
            yield sse(APIError(500, f"generation failed: {req.error}", None, type="server_error").body())
            r.finished(count, "error")
            done = True
            yield "data: [DONE]\n\n"
            return
        if req.finish_reason == "cancelled" and not r.stops.stopped:
            r.finished(count, "cancelled")
            done = True
            return  # the client is gone
        reason = r.reason()
        yield sse(r.chunk(delta(r.tail(), chat), reason, []))
        if g.include_usage:
            yield sse({"id": r.rid, "object": "chat.completion.chunk" if chat else "text_completion",
                       "created": r.created, "model": r.state.limits.model_name, "choices": [],
                       "usage": r.usage(count)})
        r.finished(count, reason)
        done = True
        yield "data: [DONE]\n\n"
    finally:
        r.watcher.cancel()
        if not req.finished:
            req.cancel()
        if not done:
            r.finished(count, "cancelled")


async def collect(r: _Run):
    """The answer of a generation not streamed: all its tokens collected, then one JSON body."""
    req = r.req
    parts, tokens = [], []
    try:
        async for token in req.stream():
            tokens.append(token)
            text, stopped = r.piece_of(token)
            parts.append(text)
            if stopped:
                req.cancel()
                break
    finally:
        r.watcher.cancel()
        if not req.finished and not r.stops.stopped:
            req.cancel()
    if req.finish_reason == "error":
        r.finished(len(tokens), "error")
        raise APIError(500, f"generation failed: {req.error}", None, type="server_error")
    if req.finish_reason == "cancelled" and not r.stops.stopped:
        r.finished(len(tokens), "cancelled")
        return Response(status_code=499)  # the client is gone; nobody reads this
    parts.append(r.tail())
    reason = r.reason()
    r.finished(len(tokens), reason)
    return await _body(r, "".join(parts), tokens, reason)


async def _body(r: _Run, text: str, tokens: list[int], reason: str) -> dict:
    lp = None
    if r.g.logprobs is not None:
        await entries_ready(r.sink, len(tokens))
        lp = logprobs_of(r.state.engine, r.sink, tokens, 0, r.chat, base=len(r.echo_text))
    if r.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                  "finish_reason": reason, "token_ids": tokens}
    else:
        choice = {"index": 0, "text": r.echo_text + text, "logprobs": lp, "finish_reason": reason,
                  "token_ids": tokens}
    return {"id": r.rid, "object": "chat.completion" if r.chat else "text_completion", "created": r.created,
            "model": r.state.limits.model_name, "choices": [choice], "usage": r.usage(len(tokens))}
