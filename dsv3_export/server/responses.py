"""The JSON of OpenAI's answers: error bodies, server-sent events, stream chunks and log-probabilities
(the completions shape or the chat shape)."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

from dsv3_export.engines.sampling import TokenLogprob
from dsv3_export.server.protocol import APIError


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def delta(text: str, chat: bool):
    return {"content": text} if chat else text


def chunk(rid: str, created: int, model: str, chat: bool, payload, reason, token_ids=None, lp=None) -> dict:
    if chat:
        choice = {"index": 0, "delta": payload, "logprobs": lp, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": payload, "logprobs": lp, "finish_reason": reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice]}


def logprobs_of(engine, tokens: list[int], entries: list[TokenLogprob], chat: bool, base: int = 0):
    """The log-probabilities of `tokens` (each token's TokenLogprob, in order) in OpenAI's shape;
    `base`: the text offset of the first (completions)."""
    entries = [(e.logprob, e.top) for e in entries]
    if chat:
        return _chat_logprobs(engine, tokens, entries)
    return _completion_logprobs(engine, tokens, entries, base)


def _token_text(engine, token: int) -> str:
    return engine.decode([token]) or ""


def _chat_logprobs(engine, tokens: list[int], entries) -> dict:
    content = []
    for tok, (lp, top) in zip(tokens, entries):
        s = _token_text(engine, tok)
        content.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                        "top_logprobs": [{"token": _token_text(engine, t), "logprob": v,
                                          "bytes": list(_token_text(engine, t).encode())} for t, v in top]})
    return {"content": content}


def _completion_logprobs(engine, tokens: list[int], entries, base: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = base
    for tok, (lp, top) in zip(tokens, entries):
        s = _token_text(engine, tok)
        out["tokens"].append(s)
        out["token_logprobs"].append(lp)
        top_map: dict[str, float] = {}
        for t, v in top:
            top_map.setdefault(_token_text(engine, t), v)
        out["top_logprobs"].append(top_map)
        out["text_offset"].append(offset)
        offset += len(s)
    return out
