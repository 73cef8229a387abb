"""Between the HTTP layer and engines.scheduler: the per-request token hook that times the gaps
between tokens for the metrics (inter-token latency)."""

from __future__ import annotations

import time
from typing import Callable


class TokenTimer:
    """`on_token` of one request (called in the scheduler's thread): reports each gap between two
    tokens to `on_gap`."""

    def __init__(self, on_gap: Callable[[float], None] | None = None):
        self.on_gap = on_gap
        self.last: float | None = None

    def __call__(self, request, token: int) -> None:
        now = time.perf_counter()
        if self.last is not None and self.on_gap is not None:
            self.on_gap(now - self.last)
        self.last = now
