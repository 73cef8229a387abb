"""One generation behind /v1/completions and /v1/chat/completions: submit the checked Generation to
the scheduler, read its tokens back with `Request.stream()` through a TextOutput (the text the
client sees: detokenized, cut at stop strings, with each token's log-probability), and answer as
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
from dsv3_export.engines.sampling import SamplingError
from dsv3_export.engines.scheduler import QueueFull
from dsv3_export.engines.text import TextOutput
from dsv3_export.server.generation import TokenTimer
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
    req: Any  # engines.scheduler.Request
    out: TextOutput
    created: int
    rid: str
    echo_text: str
    http_scope: dict
    watcher: asyncio.Task | None = None

    def push(self, token: int) -> str:
        """The text one token adds, its log-probability kept beside it (the scheduler records it
        before the token is visible)."""
        i = len(self.out.token_ids)  # this token's index among the request's tokens
        return self.out.push(token, self.req.logprobs[i] if self.g.logprobs is not None else None)

    def usage(self, n: int) -> dict[str, int]:
        prompt_len = len(self.g.prompt_ids)
        return {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}

    def chunk(self, payload, reason, token_ids=None, lp=None) -> dict:
        return chunk(self.rid, self.created, self.state.limits.model_name, self.chat, payload, reason, token_ids, lp)

    def logprobs(self, tokens: list[int], start: int, base: int = 0):
        if self.g.logprobs is None:
            return None
        entries = self.out.logprobs[start:start + len(tokens)]
        return logprobs_of(self.state.engine, tokens, entries, self.chat, base=base)

    def finished(self, completion_tokens: int, reason: str) -> None:
        # For the access line (server.app): prompt and completion tokens, and how it ended.
        self.http_scope.setdefault("state", {})["dsv3_tokens"] = (len(self.g.prompt_ids), completion_tokens, reason)
        m = self.state.metrics
        m.completion_tokens.inc(completion_tokens)
        m.finished.labels(reason).inc()
        if self.req.first_token_at is not None:
            m.ttft.observe(self.req.first_token_at - self.req.submitted)


async def run(state: State, http_request: Request, g: Generation, *, chat: bool):
    """Generate for the checked `g`: a StreamingResponse when `g.stream`, else the answer's JSON."""
    req = submit(state, g, TokenTimer(state.metrics.itl.observe))
    echo_text = ""
    if g.echo and not chat:
        echo_text = g.prompt_text if g.prompt_text is not None else (state.engine.decode(g.prompt_ids) or "")
    r = _Run(state=state, g=g, chat=chat, req=req,
             out=TextOutput(state.engine.tokenizer, stop_strings=g.stop, stop_ids=req.params.stop),
             created=int(time.time()), rid=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
             echo_text=echo_text, http_scope=http_request.scope)
    r.watcher = asyncio.create_task(watch(http_request, req))
    if g.stream:
        return StreamingResponse(events(r), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await collect(r)


def submit(state: State, g: Generation, on_token):
    """The scheduler's Request for `g`; a full queue answers 429."""
    stops = set(g.stop_token_ids) if g.ignore_eos else state.engine.stop_ids(g.stop_token_ids)
    try:
        params = g.sampling.replace(max_tokens=g.max_tokens, stop=frozenset(stops), logprobs=g.logprobs)
        req = state.scheduler.submit(g.prompt_ids, params, on_token=on_token)
    except SamplingError as e:
        raise bad(str(e), e.param) from None
    except QueueFull as e:
        raise APIError(429, f"the server is busy: {e}", None, type="rate_limit_error",
                       headers={"Retry-After": "1"}) from None
    except ExportError as e:  # the prompt: an id out of range, too long for the context
        raise bad(str(e), "prompt") from None
    state.metrics.prompt_tokens.inc(len(g.prompt_ids))
    return req


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; the generation was stopped", None, type="server_error",
                    headers={"Retry-After": "1"})


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


async def events(r: _Run):
    """The server-sent events of a streamed answer, ending with [DONE] (none when the client left)."""
    req, chat = r.req, r.chat
    count = 0
    done = False
    try:
        if chat:
            yield sse(r.chunk({"role": "assistant", "content": ""}, None, []))
        elif r.echo_text:
            yield sse(r.chunk(r.echo_text, None, []))
        async for token in req.stream():
            if r.out.stopped:
                break
            count += 1
            text = r.push(token)
            yield sse(r.chunk(delta(text, chat), None, [token], r.logprobs([token], count - 1)))
            if r.out.stops.stopped:
                req.cancel()  # a stop string: the rest is not wanted
                break
        if req.finish_reason == "error":
            yield sse(APIError(500, f"generation failed: {req.error}", None, type="server_error").body())
            r.finished(count, "error")
            done = True
            yield "data: [DONE]\n\n"
            return
        if req.finish_reason == "cancelled" and not r.out.stopped:
            r.finished(count, "cancelled")
            done = True
            if r.state.stopping.is_set():  # the server is stopping: end the stream properly
                yield sse(shutting_down().body())
                yield "data: [DONE]\n\n"
            return  # else the client is gone
        reason = r.out.finish_reason(req.finish_reason)
        yield sse(r.chunk(delta(r.out.finish(), chat), reason, []))
        if r.g.include_usage:
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
    tokens = []
    try:
        async for token in req.stream():
            tokens.append(token)
            r.push(token)
            if r.out.stops.stopped:
                req.cancel()
                break
    finally:
        r.watcher.cancel()
        if not req.finished and not r.out.stopped:
            req.cancel()
    if req.finish_reason == "error":
        r.finished(len(tokens), "error")
        raise APIError(500, f"generation failed: {req.error}", None, type="server_error")
    if req.finish_reason == "cancelled" and not r.out.stopped:
        r.finished(len(tokens), "cancelled")
        if r.state.stopping.is_set():
            raise shutting_down()
        return Response(status_code=499)  # the client is gone; nobody reads this
    r.out.finish()
    reason = r.out.finish_reason(req.finish_reason)
    r.finished(len(tokens), reason)
    return _body(r, r.out.text, tokens, reason)


def _body(r: _Run, text: str, tokens: list[int], reason: str) -> dict:
    lp = r.logprobs(tokens, 0, base=len(r.echo_text))
    if r.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                  "finish_reason": reason, "token_ids": tokens}
    else:
        choice = {"index": 0, "text": r.echo_text + text, "logprobs": lp, "finish_reason": reason,
                  "token_ids": tokens}
    return {"id": r.rid, "object": "chat.completion" if r.chat else "text_completion", "created": r.created,
            "model": r.state.limits.model_name, "choices": [choice], "usage": r.usage(len(tokens))}
