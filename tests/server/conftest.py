"""A real `dsv3-export serve` process over the demo build, on 127.0.0.1 and a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import ROOT

STARTUP_TRIES, STARTUP_PAUSE_S = 240, 0.5  # /health polled at most 2 minutes
STOP_TIMEOUT_S = 45  # SIGTERM to exit: the server's graceful timeout (30 s) and a margin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path
    api_key: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of /metrics (`labels`: the exact label text, e.g. 'reason="cancelled"'), 0 if absent."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


def start_server(build: Path, log: Path, *args: str, api_key: str | None = None) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "dsv3_export.cli.main", "serve", str(build), "--port", str(port), "--threads", "1",
           "--log-level", "warning", *args]
    if api_key:
        cmd += ["--api-key", api_key]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, port, log, api_key)
    for _ in range(STARTUP_TRIES):
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(STARTUP_PAUSE_S)
    stop_server(server)
    raise AssertionError(f"/health did not answer 200 within {STARTUP_TRIES * STARTUP_PAUSE_S:.0f} s:\n{log.read_text()}")


def stop_server(server: Server) -> int | None:
    """SIGTERM by PID; the exit code (None when it had to be killed)."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    try:
        return server.proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(10)
        return None


@pytest.fixture(scope="module")
def server(demo_build, tmp_path_factory):
    """The demo build served with 8 slots; the finalizer stops it by SIGTERM and checks it exits 0."""
    s = start_server(demo_build, tmp_path_factory.mktemp("serve") / "server.log", "--max-batch", "8")
    yield s
    rc = stop_server(s)
    assert rc == 0, f"the server exited with {rc} after SIGTERM:\n{s.log.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def small_server(demo_build, tmp_path_factory):
    """One slot, one waiting place, an API key: back-pressure and authentication."""
    s = start_server(demo_build, tmp_path_factory.mktemp("serve-small") / "server.log", "--max-batch", "1",
                     "--max-waiting", "1", api_key="sekret")
    yield s
    rc = stop_server(s)
    assert rc == 0, f"the server exited with {rc} after SIGTERM:\n{s.log.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def engine(demo_build):
    from dsv3_export import engines
    return engines.load(demo_build, threads=1)
