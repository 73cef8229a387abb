"""The OpenAI request fields we take, checked: every bad field answers 400 with OpenAI's error JSON
naming it (`APIError`). Pure functions over the parsed JSON body and the model's limits."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any

from dsv3_export.core.errors import ExportError
from dsv3_export.engines.sampling import SamplingError, SamplingParams

MAX_BODY_BYTES = 1 << 20  # a larger request body answers 413
MAX_LOGPROBS = 20
MAX_STOP = 16


class APIError(Exception):
    """An error answer: HTTP status and OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def check_api_key(api_key: str | None) -> None:
    """None: no authentication; otherwise a key that is not blank (an empty one would let every
    client in with an empty `Authorization: Bearer`)."""
    if api_key is not None and not api_key.strip():
        raise ExportError("--api-key (or DSV3_API_KEY) is empty: give a key, or leave both unset to serve "
                          "without authentication")


def bad(message: str, param: str | None) -> APIError:
    return APIError(400, message, param)


@dataclass
class Limits:
    """What the loaded model allows."""

    vocab_size: int
    max_seq_len: int
    model_name: str


@dataclass
class Generation:
    """One checked request, ready for the scheduler."""

    prompt_ids: list[int] | None = None  # completions (chat renders its messages into prompt text first)
    prompt_text: str | None = None
    max_tokens: int | None = None  # None: the rest of the context (chat's default)
    sampling: SamplingParams = field(default_factory=SamplingParams)  # max_tokens and stop ids set at submit
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # top-k log-probabilities per chosen token (None: off)
    echo: bool = False
    messages: list[dict[str, Any]] | None = None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _max_tokens(body: dict[str, Any], chat: bool):
    """The request's max_tokens (chat: max_completion_tokens first, OpenAI's newer name), or None."""
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    return next((body[n] for n in names if body.get(n) is not None), None)


def sampling_params(body: dict[str, Any], max_tokens) -> SamplingParams:
    """The request's sampling fields, by their names (engines.sampling.SamplingParams checks them:
    a bad one answers 400 naming it). OpenAI's defaults: temperature 1; without a seed a sampled
    request gets a fresh random one. max_tokens stays 1 when absent: check_context sets it."""
    values = {**body, "max_tokens": max_tokens}
    values["temperature"] = 1.0 if body.get("temperature") is None else body["temperature"]
    try:
        params = SamplingParams.from_wire(values, max_tokens=max_tokens or 1)
        if body.get("seed") is None:
            params = params.replace(seed=0 if params.greedy else secrets.randbits(63))
    except SamplingError as e:
        param = "max_completion_tokens" if e.param == "max_tokens" and body.get("max_completion_tokens") is not None \
            else e.param
        raise bad(str(e).replace("max_tokens", param, 1), param) from None
    return params


# The fields each endpoint takes besides the sampling fields (engines.sampling.SamplingParams, by
# name). Anything else is refused with 400 naming it: OpenAI clients send logit_bias, tools,
# response_format, ... expecting them to act, and ignoring them silently would answer something else.
_COMMON = {"model", "max_tokens", "stop", "stop_token_ids", "ignore_eos", "stream", "stream_options", "n", "best_of",
           "logprobs", "user"}
FIELDS = {"completions": _COMMON | {"prompt", "echo"},
          "chat": _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}}


def _known_fields(body: dict[str, Any], chat: bool) -> None:
    known = FIELDS["chat" if chat else "completions"] | {f.name for f in SamplingParams.wire_fields()}
    unknown = sorted(k for k in body if k not in known and body[k] is not None)
    if unknown:
        raise bad(f"{unknown[0]} is not supported by this server (it takes: {', '.join(sorted(known))})",
                  unknown[0])


def _common(body: dict[str, Any], limits: Limits, g: Generation, *, chat: bool) -> None:
    _known_fields(body, chat)
    model = body.get("model")
    if model is not None and model != limits.model_name:
        raise bad(f"The model `{model}` does not exist: this server serves `{limits.model_name}`", "model")
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise bad("only n=1 is supported", "n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise bad("only best_of=1 is supported", "best_of")
    given = _max_tokens(body, chat)
    g.sampling = sampling_params(body, given)
    if given is not None:
        g.max_tokens = g.sampling.max_tokens
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise bad(f"stop must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    g.stop = stop
    ids = body.get("stop_token_ids")
    ids = [] if ids is None else ids
    if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
        raise bad("stop_token_ids must be a list of token ids", "stop_token_ids")
    if any(not 0 <= t < limits.vocab_size for t in ids):
        raise bad(f"stop_token_ids: token ids must be in 0..{limits.vocab_size - 1}", "stop_token_ids")
    g.stop_token_ids = ids
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad("ignore_eos must be a boolean", "ignore_eos")
    g.ignore_eos = ignore_eos
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream must be a boolean", "stream")
    g.stream = bool(stream)
    options = body.get("stream_options")
    if options is not None:
        if not g.stream:
            raise bad("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise bad("stream_options must be an object {\"include_usage\": bool}", "stream_options")
        g.include_usage = bool(options.get("include_usage", False))


def _logprobs(value, param: str) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or not 0 <= value <= MAX_LOGPROBS:
        raise bad(f"{param} must be an integer in 0..{MAX_LOGPROBS}, got {value!r}", param)
    return value


def _check_prompt_ids(ids: list, limits: Limits) -> list[int]:
    if not ids:
        raise bad("prompt is empty", "prompt")
    if not all(_is_int(t) for t in ids):
        raise bad("prompt must be a string or a list of integer token ids", "prompt")
    wrong = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
    if wrong is not None:
        raise bad(f"prompt: token id {wrong} is out of range (vocab size {limits.vocab_size}: ids 0.."
                  f"{limits.vocab_size - 1})", "prompt")
    return list(ids)


def parse_completion(body: Any, limits: Limits) -> Generation:
    """POST /v1/completions: prompt is text or token ids (one prompt: a batch of more answers 400)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None)
    g = Generation(max_tokens=16)
    _common(body, limits, g, chat=False)
    if "prompt" not in body:
        raise bad("prompt is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt is empty", "prompt")
        g.prompt_text = prompt
    elif isinstance(prompt, list):
        if prompt and all(isinstance(p, (str, list)) for p in prompt):
            raise bad("only one prompt per request is supported (send a request per prompt)", "prompt")
        g.prompt_ids = _check_prompt_ids(prompt, limits)
    else:
        raise bad("prompt must be a string or a list of token ids", "prompt")
    g.logprobs = _logprobs(body.get("logprobs"), "logprobs")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise bad("echo must be a boolean", "echo")
    g.echo = echo
    return g


def _message_text(content, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        out = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{index}].content: only text parts are supported", f"messages[{index}].content")
            out.append(part["text"])
        return "".join(out)
    raise bad(f"messages[{index}].content must be a string or a list of text parts", f"messages[{index}].content")


def parse_chat(body: Any, limits: Limits) -> Generation:
    """POST /v1/chat/completions: messages (rendered by the chat template later)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None)
    g = Generation(max_tokens=None)
    _common(body, limits, g, chat=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string role", f"messages[{i}].role")
        out.append({**m, "content": _message_text(m.get("content"), i)})
    g.messages = out
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise bad("logprobs must be a boolean (top_logprobs: how many alternatives)", "logprobs")
    top = _logprobs(body.get("top_logprobs"), "top_logprobs")
    if top is not None and not logprobs:
        raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    g.logprobs = (top or 0) if logprobs else None
    return g


def check_context(g: Generation, prompt_len: int, limits: Limits, *, prompt_param: str) -> int:
    """max_tokens, defaulted (chat: the rest of the context) and checked against the context length."""
    if prompt_len == 0:
        raise bad("the prompt is empty", prompt_param)
    if prompt_len >= limits.max_seq_len:
        raise bad(f"the prompt ({prompt_len} tokens) does not fit the model's context length "
                  f"({limits.max_seq_len} tokens)", prompt_param)
    if g.max_tokens is None:
        return limits.max_seq_len - prompt_len
    if prompt_len + g.max_tokens > limits.max_seq_len:
        raise bad(f"prompt ({prompt_len} tokens) + max_tokens ({g.max_tokens}) exceeds the model's context "
                  f"length ({limits.max_seq_len} tokens)", "max_tokens")
    return g.max_tokens
