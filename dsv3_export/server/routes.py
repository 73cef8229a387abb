"""The endpoints: /health, /metrics, /v1/models, /v1/completions, /v1/chat/completions. Each reads
the shared State from `request.app.state.dsv3` (set in server.app.create_app), checks the key and
the fields, and hands the checked Generation to server.streaming."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from dsv3_export.core.errors import ExportError
from dsv3_export.server.chat import TemplateError
from dsv3_export.server.protocol import MAX_BODY_BYTES, APIError, bad, check_context, parse_chat, parse_completion
from dsv3_export.server.responses import error_response
from dsv3_export.server.state import State
from dsv3_export.server.streaming import run

ENDPOINTS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics"}
router = APIRouter()


def _state(request: Request) -> State:
    return request.app.state.dsv3


@router.get("/health")
async def health(request: Request):
    state = _state(request)
    if state.ready.is_set():
        return {"status": "ok"}
    status = "error" if state.warmup_error else "loading"
    return JSONResponse({"status": status, "error": state.warmup_error}, status_code=503)


@router.get("/metrics")
async def metrics(request: Request):
    return Response(_state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models")
async def models(request: Request):
    state = _state(request)
    try:
        check_auth(state, request)
    except APIError as e:
        return error_response(e)
    return {"object": "list", "data": [{"id": state.limits.model_name, "object": "model", "created": state.created,
                                        "owned_by": "dsv3-export", "max_model_len": state.limits.max_seq_len}]}


@router.post("/v1/completions")
async def completions(request: Request):
    state = _state(request)
    try:
        check_auth(state, request)
        check_ready(state)
        g = parse_completion(await read_json(request, state.client_timeout), state.limits)
        if g.prompt_ids is None:
            g.prompt_ids = tokenize(state, g.prompt_text, add_bos=True, param="prompt")
        g.max_tokens = check_context(g, len(g.prompt_ids), state.limits, prompt_param="prompt")
        return await run(state, request, g, chat=False)
    except APIError as e:
        return error_response(e)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = _state(request)
    try:
        check_auth(state, request)
        check_ready(state)
        g = parse_chat(await read_json(request, state.client_timeout), state.limits)
        if state.chat_template is None:
            raise bad("this build has no chat template (tokenizer_config.json with chat_template); "
                      "use /v1/completions", "messages")
        try:
            g.prompt_text = state.chat_template.render(g.messages, add_generation_prompt=True)
        except TemplateError as e:
            raise bad(str(e), "messages") from None
        # The template writes the special tokens itself (transformers: add_special_tokens=False).
        g.prompt_ids = tokenize(state, g.prompt_text, add_bos=False, param="messages")
        g.max_tokens = check_context(g, len(g.prompt_ids), state.limits, prompt_param="messages")
        return await run(state, request, g, chat=True)
    except APIError as e:
        return error_response(e)


# ---- the checks before a generation --------------------------------------------------------------
def check_auth(state: State, request: Request) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or token.strip() != state.api_key:
        raise APIError(401, "Incorrect or missing API key: send the header Authorization: Bearer <key>",
                       None, type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def check_ready(state: State) -> None:
    if state.stopping.is_set():
        raise APIError(503, "the server is shutting down", None, type="server_error", headers={"Connection": "close"})
    if not state.ready.is_set():
        raise APIError(503, "the model is still loading", None, type="server_error",
                       headers={"Retry-After": "1"})


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_json(request: Request, timeout: float) -> Any:
    """The request's JSON body, or the 4xx that says why not. Only a JSON Content-Type is read
    (415 otherwise): a browser sends text/plain and form types cross-site without a preflight, so
    taking them would let any web page drive a loopback server. A body slower than the server's
    client timeout (a short one: shorter than its Content-Length) answers 408 and closes the connection."""
    content_type = request.headers.get("content-type", "")
    if not _is_json(content_type):
        raise APIError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}", None)
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise bad("invalid Content-Length header", None) from None
        if declared > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes", None)
    try:
        body = await asyncio.wait_for(_read_body(request), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", None,
                       headers={"Connection": "close"}) from None
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}", None) from None
    except RecursionError:
        raise bad("the request body is not valid JSON: nested too deeply", None) from None
    try:  # "\ud800" is valid JSON but no text: it could not be tokenized, nor echoed in an answer
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad("the request body holds a lone UTF-16 surrogate (\\ud800-\\udfff): not valid Unicode text",
                  None) from None
    except RecursionError:
        raise bad("the request body is nested too deeply", None) from None
    return value


async def _read_body(request: Request) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes", None)
        chunks.append(chunk)
    return b"".join(chunks)


def tokenize(state: State, text: str, *, add_bos: bool, param: str) -> list[int]:
    if state.engine.tokenizer is None:
        raise bad("this build has no tokenizer.json: send the prompt as a list of token ids", param)
    try:
        return state.engine.tokenize(text, add_bos=add_bos)
    except ExportError as e:  # text that is no UTF-8
        raise bad(f"{param}: {e}", param) from None
