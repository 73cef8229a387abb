"""Between the HTTP layer and engines.scheduler: the per-request token sink (timings for the metrics,
log-probabilities when asked), the scheduler that records log-probabilities, and stop strings over
the incrementally decoded text."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from dsv3_export.engines.scheduler import Scheduler


class TokenSink:
    """`on_token` of one request (called in the scheduler's thread): the time of each token, and
    with `logprobs` set, each chosen token's log-probability and the top-`logprobs` alternatives."""

    def __init__(self, logprobs: int | None = None, on_gap: Callable[[float], None] | None = None):
        self.logprobs = logprobs
        self.on_gap = on_gap
        self.last: float | None = None
        self.entries: list[tuple[float, list[tuple[int, float]]]] = []  # per token: (its logprob, top-k)
        self._pending: np.ndarray | None = None

    def observe_logits(self, row: np.ndarray) -> None:
        """The logits [V] the next token is picked from (before sampling settings: the model's own
        distribution, as OpenAI's logprobs)."""
        x = row.astype(np.float64)
        m = x.max()
        self._pending = x - (m + np.log(np.exp(x - m).sum()))

    def __call__(self, request, token: int) -> None:
        now = time.perf_counter()
        if self.last is not None and self.on_gap is not None:
            self.on_gap(now - self.last)
        self.last = now
        if self.logprobs is not None and self._pending is not None:
            lp = self._pending
            k = self.logprobs
            top: list[tuple[int, float]] = []
            if k:
                idx = np.argpartition(-lp, min(k, lp.size - 1))[:k] if k < lp.size else np.arange(lp.size)
                idx = idx[np.lexsort((idx, -lp[idx]))]  # most likely first, lower id among equals
                top = [(int(i), float(lp[i])) for i in idx]
            self.entries.append((float(lp[token]), top))
            self._pending = None


class ServingScheduler(Scheduler):
    """engines.scheduler.Scheduler that shows each pick's logits to a request's TokenSink when it asks
    for log-probabilities (the Request API does not carry logits; this hooks `_pick`, the one place
    every sampled token goes through, without changing what is sampled)."""

    def _pick(self, req, logits: np.ndarray) -> int:
        sink = req.on_token
        if isinstance(sink, TokenSink) and sink.logprobs is not None:
            sink.observe_logits(logits[0])
        return super()._pick(req, logits)


