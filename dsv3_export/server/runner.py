"""Run the app under uvicorn: one process, loopback by default, SIGTERM = graceful stop, exit 0."""

from __future__ import annotations

import logging
import signal

import uvicorn

from dsv3_export.core.http_limits import CLIENT_TIMEOUT_S, with_header_timeout
from dsv3_export.server.app import create_app

GRACEFUL_TIMEOUT_S = 30  # SIGTERM: open requests get this long to finish, then they are cancelled


class _Server(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM / SIGINT that it shut down for gracefully is not raised
    again afterwards (uvicorn re-raises it, which would end the process by the signal: exit 0 instead)."""

    on_exit = None  # called once a stop is asked for (State.begin_shutdown)

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals = [s for s in self._captured_signals if s not in (signal.SIGTERM, signal.SIGINT)]
        if self.on_exit is not None:
            self.on_exit()


def serve(engine, *, host: str = "127.0.0.1", port: int = 8000, model_name: str, api_key: str | None = None,
          max_batch: int = 8, max_waiting: int = 256, prefill_chunk: int = 256, log_level: str = "info",
          graceful_timeout: int = GRACEFUL_TIMEOUT_S, client_timeout: float = CLIENT_TIMEOUT_S) -> None:
    """Serve `engine` until SIGTERM / SIGINT. `client_timeout`: seconds a client has to send a
    request's headers (else its connection is closed) and then its body (else 408)."""
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(levelname)s: %(message)s")
    app = create_app(engine, model_name=model_name, api_key=api_key, max_batch=max_batch, max_waiting=max_waiting,
                     prefill_chunk=prefill_chunk, client_timeout=client_timeout)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=graceful_timeout, access_log=False, http=with_header_timeout(client_timeout))
    server = _Server(config)
    server.on_exit = lambda: app.state.dsv3.begin_shutdown(graceful_timeout)
    server.run()
