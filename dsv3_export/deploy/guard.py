"""The guard in front of `tritonserver`'s HTTP port (`dsv3-export triton --serve`).

tritonserver 2.51's HTTP front end has limits a hostile client finds, and no option to set them:
- its JSON parser recurses once per nesting level: one 200 KB body nested 100,000 arrays deep
  makes the server segfault;
- it converts a JSON integer to the input's declared type without a range check (max_tokens
  4294967300 arrives as INT32 4);
- it never times out a client trickling its headers or sending a body shorter than its length;
- a non-streaming `generate` whose client left keeps its sequence decoding to the end: nothing is
  written to the connection before the answer, so the server never notices it is closed.

The guard listens where clients connect and forwards to tritonserver on a private loopback port:
- bodies up to MAX_BODY_BYTES, JSON nested at most MAX_JSON_DEPTH deep (400 otherwise);
- every integer input of the text model within its declared type (400 naming the input);
- headers and body within the client timeout (core.http_limits; closed, or 408);
- a request of the text model for one answer (`generate`, or `generate_stream` without
  `stream: true`) is forwarded as `generate_stream` with `stream: true` and the pieces joined into
  that answer, so that a client that leaves closes a stream Triton writes to at every token, and
  the request is cancelled (its slot freed) as an abandoned stream's is;
- on SIGTERM, open answers get GRACEFUL_S seconds, then end properly (an error event, or 503).
gRPC goes to tritonserver directly (its protobuf parser has none of these problems).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dsv3_export.core.errors import ExportError
from dsv3_export.core.http_limits import CLIENT_TIMEOUT_S, with_header_timeout
from dsv3_export.deploy.llm import INPUTS

MAX_BODY_BYTES = 64 << 20  # tritonserver's own default --http-max-input-size
MAX_JSON_DEPTH = 32
GRACEFUL_S = 5  # on SIGTERM, open requests through the guard get this long; tritonserver is signalled after
TEXT_MODEL = "dsv3"
_INT_RANGE = {"TYPE_INT32": (-2**31, 2**31 - 1), "TYPE_INT64": (-2**63, 2**63 - 1)}
_GENERATE = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/[^/]+)?/(?P<kind>generate|generate_stream)$")
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_BRACKETS = re.compile(rb"[\[\]{}]")
_HOP_BY_HOP = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
               "proxy-connection", "trailer"}


class _Stopped(Exception):
    """The guard is stopping: the answer being relayed ends now."""


class Refused(Exception):
    """A request the guard answers itself (status, message) without forwarding it."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def json_depth(data: bytes) -> int:
    """How deep a JSON text's arrays and objects nest, read without parsing (no recursion)."""
    depth = deepest = 0
    for m in _BRACKETS.finditer(_STRINGS.sub(b'""', data)):
        depth += 1 if m.group() in (b"[", b"{") else -1
        deepest = max(deepest, depth)
    return deepest


def check_body(data: bytes, content_type: str, header_length: str | None) -> None:
    """Refused for a body Triton's JSON parser must not see: too deep (the JSON part of a binary
    inference request is its first Inference-Header-Content-Length bytes)."""
    if header_length is not None:
        try:
            data = data[:int(header_length)]
        except ValueError:
            raise Refused(400, "Inference-Header-Content-Length is not an integer") from None
    elif "json" not in content_type and not data.lstrip()[:1] in (b"{", b"["):
        return
    if json_depth(data) > MAX_JSON_DEPTH:
        raise Refused(400, f"the request's JSON nests deeper than {MAX_JSON_DEPTH} levels")


def check_text_fields(body: Any) -> None:
    """Every integer input of the text model fits its declared type (Triton would wrap it)."""
    if not isinstance(body, dict):
        return
    for name, kind, _, _ in INPUTS:
        low_high = _INT_RANGE.get(kind)
        values = body.get(name)
        for value in values if isinstance(values, list) else [values]:
            if low_high and isinstance(value, int) and not isinstance(value, bool) and \
                    not low_high[0] <= value <= low_high[1]:
                raise Refused(400, f"{name}: {value} does not fit the input's type {kind[5:]} "
                                   f"({low_high[0]}..{low_high[1]})")


def _error_body(raw: bytes) -> dict:
    """tritonserver's error answer as generate gives it ({"error": ...}), from generate_stream's,
    which may come as a server-sent event."""
    text = raw.decode("utf-8", "replace").strip()
    if text.startswith("data:"):
        text = text.splitlines()[0][len("data:"):].strip()
    try:
        body = json.loads(text)
    except ValueError:
        return {"error": text or "tritonserver answered with an error and no message"}
    return body if isinstance(body, dict) and "error" in body else {"error": text}


class Guard:
    """The ASGI app: checks, then forwards to `upstream` (tritonserver's HTTP URL)."""

    def __init__(self, upstream: str, client_timeout: float = CLIENT_TIMEOUT_S):
        self.upstream, self.client_timeout = upstream.rstrip("/"), client_timeout
        self.client: httpx.AsyncClient | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None  # set in the guard's loop when open answers must end
        self.app = Starlette(routes=[Route("/{path:path}", self.handle,
                                           methods=["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"])],
                             lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.loop, self.stop_event = asyncio.get_running_loop(), asyncio.Event()
        # No idle connections kept to tritonserver: on SIGTERM it waits for every open HTTP
        # connection to close before it exits.
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0),
                                        limits=httpx.Limits(max_keepalive_connections=0))
        try:
            yield
        finally:
            await self.client.aclose()

    async def handle(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            check_body(body, request.headers.get("content-type", ""),
                       request.headers.get("inference-header-content-length"))
            route = _GENERATE.match(request.url.path)
            if route and route["model"] == TEXT_MODEL and request.method == "POST":
                try:
                    fields = json.loads(body)
                except (ValueError, RecursionError):
                    fields = None  # Triton's own parse error answers it
                check_text_fields(fields)
                if isinstance(fields, dict) and fields.get("stream") is not True:
                    return await self._generate(request, fields, sse=route["kind"] == "generate_stream")
            return await self._forward(request, body)
        except Refused as e:
            return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)
        except httpx.HTTPError as e:  # tritonserver is gone or stopping
            return JSONResponse({"error": f"tritonserver did not answer: {type(e).__name__}"}, status_code=502)

    async def _body(self, request: Request) -> bytes:
        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise Refused(413, f"the request body is over {MAX_BODY_BYTES} bytes", {"Connection": "close"})
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), self.client_timeout)
        except asyncio.TimeoutError:
            raise Refused(408, f"the request body did not arrive within {self.client_timeout:g} s",
                          {"Connection": "close"}) from None

    def _upstream_request(self, request: Request, path: str, body: bytes) -> httpx.Request:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        url = f"{self.upstream}{path}" + (f"?{request.url.query}" if request.url.query else "")
        return self.client.build_request(request.method, url, headers=headers, content=body)

    def close_open(self) -> None:
        """Stopping (called in the guard's loop): every answer being relayed ends itself (a stream
        with an error event), so that no client connection is cut and no connection to
        tritonserver is left for it to wait on."""
        self.stop_event.set()

    async def _until_stop(self, pieces):
        """The items of an async iterator until the guard stops (then _Stopped)."""
        it = pieces.__aiter__()
        stop = asyncio.ensure_future(self.stop_event.wait())
        try:
            while True:
                step = asyncio.ensure_future(it.__anext__())
                await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    step.cancel()
                    raise _Stopped
                try:
                    item = step.result()
                except StopAsyncIteration:
                    return
                yield item
        finally:
            stop.cancel()

    async def _send(self, req: httpx.Request) -> httpx.Response:
        """The upstream answer's head (streamed), or _Stopped when the guard stops first."""
        stop = asyncio.ensure_future(self.stop_event.wait())
        sending = asyncio.ensure_future(self.client.send(req, stream=True))
        try:
            await asyncio.wait({sending, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not sending.done():
            sending.cancel()  # closes the connection: tritonserver cancels the request
            raise _Stopped
        return sending.result()

    async def _relay(self, upstream: httpx.Response, sse: bool):
        try:
            async for chunk in self._until_stop(upstream.aiter_raw()):
                yield chunk
        except _Stopped:
            if sse:
                yield b'data: {"error": "the server is shutting down"}\n\n'
        finally:
            await upstream.aclose()

    async def _forward(self, request: Request, body: bytes) -> Response:
        try:
            upstream = await self._send(self._upstream_request(request, request.url.path, body))
        except _Stopped:
            return JSONResponse({"error": "the server is shutting down"}, status_code=503)
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
        sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
        return StreamingResponse(self._relay(upstream, sse), status_code=upstream.status_code, headers=headers)

    async def _generate(self, request: Request, fields: dict, sse: bool) -> Response:
        """A request for one answer (`generate`, or `generate_stream` without `stream: true`) as a
        per-token `generate_stream`, the texts joined into that one answer (JSON, or one event);
        the stream is closed, and the request cancelled upstream, as soon as the client is gone."""
        path = request.url.path.rsplit("/", 1)[0] + "/generate_stream"
        body = json.dumps({**fields, "stream": True}).encode()
        task = asyncio.ensure_future(self._collect(self._upstream_request(request, path, body)))
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if not done and await request.is_disconnected():
                task.cancel()  # closes the upstream stream: Triton cancels the request
                return Response(status_code=499)
        status, answer = task.result()
        if sse and status == 200:
            return Response(f"data: {json.dumps(answer)}\n\n", media_type="text/event-stream")
        return JSONResponse(answer, status_code=status)

    async def _collect(self, req: httpx.Request) -> tuple[int, dict]:
        texts: list[str] = []
        last: dict = {}
        try:
            r = await self._send(req)
        except _Stopped:
            return 503, {"error": "the server is shutting down; the generation was stopped"}
        try:
            if r.status_code != 200:
                return r.status_code, _error_body(await r.aread())
            async for line in self._until_stop(r.aiter_lines()):
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[len("data:"):])
                if "error" in event:
                    return 400, {"error": event["error"]}
                texts.append(event.get("text_output", ""))
                last = event
        except _Stopped:
            return 503, {"error": "the server is shutting down; the generation was stopped"}
        finally:
            await r.aclose()
        return 200, {**{k: v for k, v in last.items() if k != "text_output"}, "text_output": "".join(texts)}


class GuardServer:
    """The guard on host:port in a thread of its own (uvicorn), until `stop`."""

    def __init__(self, upstream: str, host: str, port: int, client_timeout: float = CLIENT_TIMEOUT_S):
        self.guard = Guard(upstream, client_timeout)
        config = uvicorn.Config(self.guard.app, host=host, port=port, log_level="warning",
                                lifespan="on", access_log=False, http=with_header_timeout(client_timeout),
                                timeout_graceful_shutdown=GRACEFUL_S)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="dsv3-triton-guard", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        for _ in range(int(timeout / 0.05)):
            if self.server.started or not self.thread.is_alive():
                break
            threading.Event().wait(0.05)
        if not self.server.started:
            raise ExportError(f"the HTTP guard could not listen on {self.server.config.host}:"
                              f"{self.server.config.port} (in use?)")

    def begin_stop(self) -> None:
        """Stop accepting; open requests get GRACEFUL_S seconds less a second, then the guard ends
        them (closing their upstream streams, which cancels them in tritonserver)."""
        self.server.should_exit = True
        loop = self.guard.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.call_later, max(0.0, GRACEFUL_S - 1), self.guard.close_open)

    def stop(self, timeout: float = GRACEFUL_S + 5) -> None:
        self.begin_stop()
        if self.thread.is_alive():
            self.thread.join(timeout)
