"""`dsv3-export bench-serve URL`: C concurrent streaming clients send N completion requests of P
prompt tokens and M completion tokens each; aggregate completion tokens/s, time-to-first-token and
inter-token latency percentiles, measured at the client (docs/serving.md, "Load generator").

Prompts are token ids (seeded, from ids 2..999 so they exist in any vocabulary and avoid BOS/EOS),
sent to /v1/completions with `ignore_eos` so every request makes exactly M tokens; greedy. Works
against any OpenAI-compatible server that takes token-id prompts (llama.cpp's llama-server does)."""

from __future__ import annotations

import asyncio
import builtins
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from dsv3_export.core.errors import ExportError


@dataclass
class _One:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    error: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks; None when empty."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


_GROUPS = getattr(builtins, "BaseExceptionGroup", ())  # Python 3.11+


def reason(e: BaseException, timeout: float) -> str:
    """Why a request to the server failed, in words (httpx's own messages are often empty)."""
    while isinstance(e, _GROUPS) and e.exceptions:  # anyio's task groups wrap the cause
        e = e.exceptions[0]
    if isinstance(e, httpx.TimeoutException):
        return f"no answer within {timeout:g} s ({type(e).__name__}); a slow server needs a larger --timeout"
    if isinstance(e, httpx.ConnectError):
        return f"cannot connect ({e or 'connection refused'}); is the server running at that address?"
    if isinstance(e, (httpx.ReadError, httpx.RemoteProtocolError)):
        return f"the server closed the connection ({type(e).__name__}{': ' + str(e) if str(e) else ''})"
    if isinstance(e, httpx.HTTPStatusError):
        return f"HTTP {e.response.status_code} from {e.request.url}"
    return f"{type(e).__name__}: {e}"


async def _one(client: httpx.AsyncClient, url: str, body: dict, headers: dict, timeout: float) -> _One:
    out = _One()
    t0 = time.perf_counter()
    last = usage = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    out.error = msg["error"].get("message")
                    break
                if isinstance(msg.get("usage"), dict) and msg["usage"].get("completion_tokens") is not None:
                    usage = int(msg["usage"]["completion_tokens"])  # the server's own count wins
                choices = msg.get("choices") or []
                if not choices:
                    continue  # the usage chunk
                c = choices[0]
                if isinstance(c.get("token_ids"), list):
                    n = len(c["token_ids"])
                else:  # a token whose text is not complete yet streams as "" (split UTF-8): still a token
                    n = 1 if c.get("finish_reason") is None or c.get("text") else 0
                if n == 0:
                    continue  # a chunk that carries no token (the final one)
                now = time.perf_counter()
                if out.ttft is None:
                    out.ttft = now - t0
                elif last is not None:
                    out.gaps.append(now - last)
                last = now
                out.tokens += n
    except httpx.HTTPError as e:
        out.error = reason(e, timeout)
    if usage is not None:
        out.tokens = usage
    out.seconds = time.perf_counter() - t0
    return out


async def _run(base_url: str, *, concurrency: int, requests: int, prompt_tokens: int, max_tokens: int,
               model: str | None, api_key: str | None, seed: int, timeout: float) -> dict[str, Any]:
    base = base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, 1000) for _ in range(prompt_tokens)] for _ in range(requests)]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        if model is None:
            try:
                r = await client.get(f"{base}/models", headers=headers)
                r.raise_for_status()
                model = r.json()["data"][0]["id"]
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
                why = reason(e, timeout) if isinstance(e, httpx.HTTPError) else "not an OpenAI model list"
                raise ExportError(f"{base}/models: {why}") from None
        queue: asyncio.Queue = asyncio.Queue()
        for p in prompts:
            queue.put_nowait(p)
        results: list[_One] = []

        async def worker():
            while True:
                try:
                    p = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                body = {"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0.0,
                        "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
                results.append(await _one(client, f"{base}/completions", body, headers, timeout))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r.error is None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    tokens = sum(r.tokens for r in ok)

    def ms(x):
        return None if x is None else round(x * 1000, 2)

    return {
        "url": base_url, "model": model, "concurrency": concurrency, "requests": requests,
        "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "seed": seed,
        "succeeded": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "wall_seconds": round(wall, 3), "completion_tokens": tokens,
        "completion_tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "requests_per_s": round(len(ok) / wall, 3) if wall > 0 else None,
        "ttft_ms": {"p50": ms(percentile(ttfts, 50)), "p99": ms(percentile(ttfts, 99)),
                    "mean": ms(sum(ttfts) / len(ttfts)) if ttfts else None},
        "itl_ms": {"p50": ms(percentile(gaps, 50)), "p99": ms(percentile(gaps, 99)),
                   "mean": ms(sum(gaps) / len(gaps)) if gaps else None},
    }


def run(base_url: str, *, concurrency: int = 8, requests: int = 32, prompt_tokens: int = 128, max_tokens: int = 64,
        model: str | None = None, api_key: str | None = None, seed: int = 0, timeout: float = 600.0) -> dict[str, Any]:
    """The load test's figures (see the module docstring)."""
    return asyncio.run(_run(base_url, concurrency=concurrency, requests=requests, prompt_tokens=prompt_tokens,
                            max_tokens=max_tokens, model=model, api_key=api_key, seed=seed, timeout=timeout))
