"""`dsv3-export triton --serve` under hostile clients, through its guard: the cases that crashed or
fooled tritonserver 2.51 end in a clean 4xx, or the safe behaviour, and the server keeps serving."""

from __future__ import annotations

import os
import socket
import threading
import time

import httpx
import pytest

from dsv3_export.deploy.guard import MAX_JSON_DEPTH, json_depth
from tests.deploy.conftest import pipeline_build  # noqa: F401  (a fixture)
from tests.deploy.test_tritonserver import (  # noqa: F401  (engine, server: fixtures)
    CLIENT_TIMEOUT_S,
    TIMEOUT,
    engine,
    server,
    start_triton,
    stop_triton,
)
from tests.helpers import closed_within


def generate(triton, body: bytes | dict, path: str = "generate", timeout: float = TIMEOUT) -> httpx.Response:
    url = f"{triton.http}/v2/models/dsv3/{path}"
    if isinstance(body, dict):
        return httpx.post(url, json=body, timeout=timeout)
    return httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=timeout)


def still_serving(triton, model) -> None:
    r = generate(triton, {"text_input": "def main(", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["text_output"] == model.generate("def main(", max_new_tokens=3).text


def test_json_depth_is_read_without_recursion():
    assert json_depth(b'{"a": [1, {"b": "[[[[not nesting]]]"}], "c": "\\\\\\"["}') == 3
    assert json_depth(b"[" * 100_000 + b"]" * 100_000) == 100_000


@pytest.mark.parametrize("path", ["generate", "generate_stream"])
def test_deeply_nested_json_is_refused_not_a_crash(server, engine, path):  # noqa: F811
    """100,000 nested arrays segfault tritonserver 2.51's parser: the guard answers 400."""
    body = b'{"text_input": ' + b"[" * 100_000 + b"]" * 100_000 + b', "max_tokens": 2}'
    r = generate(server, body, path)
    assert r.status_code == 400 and f"deeper than {MAX_JSON_DEPTH}" in r.json()["error"], r.text
    infer = b'{"inputs": [' + b"[" * 50_000 + b"]" * 50_000 + b"]}"
    r = httpx.post(f"{server.http}/v2/models/dsv3_stage0/infer", content=infer, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    still_serving(server, engine)


@pytest.mark.parametrize("field,value", [("max_tokens", 4294967300), ("max_tokens", 2147483648), ("top_k", -2**40),
                                         ("seed", 2**64)])
def test_integers_that_do_not_fit_their_input_are_refused(server, engine, field, value):  # noqa: F811
    """Triton converts 4294967300 to INT32 4 without a word: refused, naming the input."""
    r = generate(server, {"text_input": "x", field: value})
    assert r.status_code == 400 and r.json()["error"].startswith(f"{field}: {value} does not fit"), r.text
    still_serving(server, engine)


def test_abandoned_requests_free_their_slots(server, engine):  # noqa: F811
    """Clients that give up on long non-streaming generates (2 s timeout) leave; the next request is
    answered in seconds, not after their 1900 tokens each."""
    def abandon():
        try:
            generate(server, {"text_input": "def main(", "max_tokens": 1900, "temperature": 1.0}, timeout=2)
        except httpx.TimeoutException:
            pass

    threads = [threading.Thread(target=abandon) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    t0 = time.monotonic()
    still_serving(server, engine)
    assert time.monotonic() - t0 < 60


def test_slow_clients_are_cut_off(server, engine):  # noqa: F811
    port = int(server.http.rsplit(":", 1)[1])
    trickling = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"POST /v2/models/dsv3/generate HTTP/1.1\r\nHost: x\r\n")
        trickling.append(s)
    for s in trickling:
        assert closed_within(s, CLIENT_TIMEOUT_S + 10) == b""
        s.close()
    short = socket.create_connection(("127.0.0.1", port), timeout=30)
    short.sendall(b"POST /v2/models/dsv3/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"text_input\": ")
    answer = closed_within(short, CLIENT_TIMEOUT_S + 10)
    short.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    still_serving(server, engine)


def test_sigterm_with_streams_open_exits_0_and_leaves_no_shared_memory(pipeline_build, tmp_path, engine):  # noqa: F811
    """Three long streams open at SIGTERM: the guard gives them GRACEFUL_S, closes them, Triton
    cancels their requests, and the server exits 0 in time with no process and no /dev/shm region left."""
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    triton = start_triton(pipeline_build, tmp_path)
    ends: list[str] = []

    def stream(per_token: bool):
        body = {"text_input": "def main(", "max_tokens": 1900, "temperature": 1.0, "stream": per_token}
        try:
            with httpx.stream("POST", f"{triton.http}/v2/models/dsv3/generate_stream", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    ends.append(line)
        except httpx.HTTPError as e:
            ends.append(type(e).__name__)

    threads = [threading.Thread(target=stream, args=(i < 2,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(3)  # the streams are running
    t0 = time.monotonic()
    stop_triton(triton)
    for t in threads:
        t.join(60)
    assert time.monotonic() - t0 < 30, triton.log.read_text()[-3000:]
    shm_after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not (shm_after - shm_before), shm_after - shm_before
    assert not any(t.is_alive() for t in threads)
    assert "Traceback" not in triton.log.read_text()
