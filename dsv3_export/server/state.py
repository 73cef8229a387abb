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
    warmup_error: str | None = None
