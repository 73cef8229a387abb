"""What both HTTP front ends (`serve`'s OpenAI server and `triton --serve`'s guard) do about slow
clients: a request's headers must arrive within the client timeout, else the connection closes.

uvicorn's keep-alive timer restarts on every byte, so a client trickling its headers (slowloris)
would hold a connection, and a file descriptor, forever. The body has its own limit where it is
read (a 408)."""

from __future__ import annotations

import socket

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from dsv3_export.core.errors import ExportError

CLIENT_TIMEOUT_S = 30.0  # a request's headers, then its body, must arrive within this


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline of `header_timeout` seconds from a connection's
    opening (or its previous answer) to the end of the next request's headers."""

    header_timeout = CLIENT_TIMEOUT_S

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._cycles = 0
        self._arm()

    def on_response_complete(self) -> None:
        self._cycles += 1
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        cycle = self._cycles
        self.loop.call_later(self.header_timeout, self._headers_overdue, cycle)

    def _headers_overdue(self, cycle: int) -> None:
        if cycle == self._cycles and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # no request is open on it: nothing to answer


def with_header_timeout(seconds: float) -> type[HeaderTimeoutH11]:
    """The protocol class for uvicorn.Config(http=...) with that deadline."""
    return type("HeaderTimeoutH11", (HeaderTimeoutH11,), {"header_timeout": float(seconds)})


def check_port_free(host: str, port: int, flag: str) -> None:
    """One line naming the flag when host:port is taken (`serve` and Triton both default to 8000),
    before anything is loaded; port 0 (any free port) always passes."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ExportError(f"{flag} {port}: {host}:{port} is not free ({e.strerror}); another server holds it "
                              f"(dsv3-export serve and Triton's HTTP both default to 8000): pick another "
                              f"{flag}") from None
