"""What every request of one served model shares: the engine, its scheduler, the limits of the
fields, the metrics, the chat template, the API key, and whether the warm-up is done."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from dsv3_export.engines.scheduler import Scheduler
from dsv3_export.server.chat import ChatTemplate
from dsv3_export.server.metrics import Metrics
from dsv3_export.server.protocol import Limits

SHUTDOWN_MARGIN_S = 1.0  # open requests are ended this long before the graceful timeout runs out


@dataclass
class State:
    engine: Any
    scheduler: Scheduler
    limits: Limits
    metrics: Metrics
    chat_template: ChatTemplate | None
    api_key: str | None = None
    client_timeout: float = 30.0  # seconds a request body may take to arrive (routes.read_json: else 408)
    created: int = field(default_factory=lambda: int(time.time()))
    ready: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)  # SIGTERM came: the server drains
    warmup_error: str | None = None

    def begin_shutdown(self, grace: float) -> None:
        """SIGTERM: open requests get `grace` seconds less a margin to finish; then every request
        still open is cancelled, so that each answer ends properly (a stream with an error event and
        [DONE], a plain request with 503) before uvicorn's own deadline cuts the connections."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        timer = threading.Timer(max(0.0, grace - SHUTDOWN_MARGIN_S), self.scheduler.cancel_all)
        timer.daemon = True
        timer.start()
