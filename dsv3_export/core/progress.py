"""Progress reporting: long work (build, verify) reports its stages here.

`Reporter` is the default, for the Python API and for a CLI whose stderr is not a terminal: each
stage logs a record when it starts and ends (logger `dsv3_export.progress`, INFO), and while one
runs a line every `DSV3_PROGRESS_SECONDS` (10 s) with how far it is and, where the stage has a size,
an ETA. On a terminal the CLI shows rich progress bars instead (cli/main.py)."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

log = logging.getLogger("dsv3_export.progress")
PERIOD_S = float(os.environ.get("DSV3_PROGRESS_SECONDS", "10"))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Reporter:
    """Progress sink. `stage(name, total)` starts a stage and returns its advance(n) callback;
    `done(name)` ends it. Stages are logged; a daemon thread logs the running one periodically."""

    def __init__(self, period: float = PERIOD_S):
        self.period = period
        self._lock = threading.Lock()
        self._stages: dict[str, list] = {}  # name -> [started, total, done so far]
        self._ticker: threading.Thread | None = None

    def stage(self, name: str, total: int | None = None) -> Callable[[int], None]:
        with self._lock:
            self._stages[name] = [time.monotonic(), total, 0]
            if self._ticker is None:
                self._ticker = threading.Thread(target=self._tick, name="dsv3-progress", daemon=True)
                self._ticker.start()
        log.info("%s%s", name, f" ({total} steps)" if total else "")

        def advance(n: int = 1) -> None:
            with self._lock:
                if name in self._stages:
                    self._stages[name][2] += n
        return advance

    def done(self, name: str) -> None:
        with self._lock:
            entry = self._stages.pop(name, None)
        if entry is not None:
            log.info("%s: done in %s", name, _duration(time.monotonic() - entry[0]))

    def _tick(self) -> None:
        while True:
            time.sleep(self.period)
            with self._lock:
                running = [(name, list(entry)) for name, entry in self._stages.items()]
            for name, (started, total, count) in running:
                elapsed = time.monotonic() - started
                if total and count:
                    eta = elapsed / count * (total - count)
                    log.info("%s: %d/%d (%.0f%%), %s so far, about %s left", name, count, total, 100 * count / total,
                             _duration(elapsed), _duration(eta))
                else:
                    log.info("%s: still running, %s so far", name, _duration(elapsed))
