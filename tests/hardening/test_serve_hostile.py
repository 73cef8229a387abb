"""`dsv3-export serve` under hostile clients: every case ends in a clean 4xx (or the connection
closed), and the server keeps serving. A real server process on 127.0.0.1, a free port."""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import pytest

from tests.helpers import closed_within
from tests.server.conftest import start_server, stop_server

CLIENT_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def server(demo_build, tmp_path_factory):
    s = start_server(demo_build, tmp_path_factory.mktemp("hostile") / "server.log", "--max-batch", "2",
                     "--client-timeout", str(CLIENT_TIMEOUT_S))
    yield s
    assert stop_server(s) == 0, s.log.read_text()[-3000:]


def still_serving(server) -> None:
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "ok", "max_tokens": 1}, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_a_non_json_content_type_is_refused_415(server, content_type):
    """A browser sends these cross-site without a preflight: they must not drive the server."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = httpx.post(f"{server.url}{path}", content=json.dumps({"prompt": "x", "max_tokens": 1}).encode(),
                       headers=headers, timeout=30)
        assert r.status_code == 415 and r.json()["error"]["type"] == "invalid_request_error", r.text
    still_serving(server)


@pytest.mark.parametrize("body", [
    b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # RecursionError in the JSON parser
    b'{"prompt": "\\ud800 lone", "max_tokens": 1}',
    b'{"model": "\\udfff", "prompt": "x"}',
], ids=["nested", "surrogate-prompt", "surrogate-model"])
def test_client_errors_answer_400_not_500(server, body):
    r = httpx.post(f"{server.url}/v1/completions", content=body, headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"], r.text
    chat = {"messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 1}
    r = httpx.post(f"{server.url}/v1/chat/completions", content=json.dumps(chat).encode(),
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    still_serving(server)


def _raw(server, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.sendall(data)
    return s


def test_trickled_headers_and_short_bodies_are_cut_off(server):
    """slowloris: 20 connections sending a header line now and then are closed once the client
    timeout has passed; a body shorter than its Content-Length answers 408 and is closed."""
    trickling = [_raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n") for _ in range(20)]
    for s in trickling:
        s.sendall(b"X-Slow: 1\r\n")
    for s in trickling:
        assert closed_within(s, CLIENT_TIMEOUT_S + 10) == b""
        s.close()
    short = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"prompt\": ")
    answer = closed_within(short, CLIENT_TIMEOUT_S + 10)
    short.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    idle = _raw(server, b"")  # connected, nothing sent
    assert closed_within(idle, CLIENT_TIMEOUT_S + 10) == b""
    idle.close()
    still_serving(server)


@pytest.mark.parametrize("args,env", [(["--api-key", ""], {}), (["--api-key", "  "], {}), ([], {"DSV3_API_KEY": ""})],
                         ids=["flag", "blank", "env"])
def test_an_empty_api_key_is_refused_at_start(demo_build, args, env, monkeypatch):
    """An empty key would let every client in with `Authorization: Bearer`; refused in one line
    before the build loads."""
    from click.testing import CliRunner

    from dsv3_export.cli.main import main
    from tests.helpers import assert_clean_error

    monkeypatch.delenv("DSV3_API_KEY", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(main, ["serve", str(demo_build), "--port", "1", *args])
    assert_clean_error(r, "--api-key (or DSV3_API_KEY) is empty")


def test_bench_serve_against_a_dead_or_silent_url_says_why(tmp_path):
    """Refused and silent servers each get one line with the reason, within --timeout."""
    from click.testing import CliRunner

    from dsv3_export.cli.main import main
    from tests.helpers import assert_clean_error
    from tests.server.conftest import free_port

    dead = CliRunner().invoke(main, ["bench-serve", f"http://127.0.0.1:{free_port()}", "--requests", "1"])
    assert_clean_error(dead, "cannot connect")
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        t0 = time.monotonic()
        r = CliRunner().invoke(main, ["bench-serve", f"http://127.0.0.1:{silent.getsockname()[1]}", "--requests", "1",
                                      "--timeout", "1"])
    assert_clean_error(r, "no answer within 1 s")
    assert time.monotonic() - t0 < 30


def test_streams_open_at_shutdown_end_with_an_error_and_done(demo_build, tmp_path):
    """SIGTERM with three long streams open and --graceful-timeout 3: each stream ends with an error
    event naming the shutdown and [DONE] (not a cut connection), the server exits 0 within the
    timeout, and its log holds no traceback."""
    import threading

    s = start_server(demo_build, tmp_path / "server.log", "--max-batch", "4", "--graceful-timeout", "3",
                     "--log-level", "info")
    got: list[str] = []
    done = httpx.post(f"{s.url}/v1/completions", json={"prompt": [5, 6], "max_tokens": 4, "ignore_eos": True},
                      timeout=60)
    assert done.status_code == 200

    def stream():
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": [5, 6], "max_tokens": 1900, "stream": True,
                                                         "ignore_eos": True}, timeout=120)
        got.append(r.text)

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while s.metric("dsv3_running_sequences") < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    t0 = time.monotonic()
    rc = stop_server(s)
    for t in threads:
        t.join(60)
    assert rc == 0 and time.monotonic() - t0 < 20, s.log.read_text()[-3000:]
    assert len(got) == 3
    for text in got:
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "shutting down" in json.loads(events[-2])["error"]["message"], text[-500:]
    log = s.log.read_text()
    assert "Traceback" not in log
    # one access line per request, with its tokens and latency (serve logs requests at --log-level info)
    line = r'127\.0\.0\.1:\d+ - "POST /v1/completions" 200 2\+4 tokens \(length\) \d+\.\d+ s'
    assert re.search(line, log), log[-2000:]


def test_a_tiny_temperature_is_served_greedy(server):
    greedy = httpx.post(f"{server.url}/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0,
                                                              "ignore_eos": True}, timeout=60).json()
    tiny = httpx.post(f"{server.url}/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 6, "temperature": 1e-308,
                                                            "seed": 9, "ignore_eos": True}, timeout=60).json()
    assert tiny["choices"][0]["token_ids"] == greedy["choices"][0]["token_ids"]


@pytest.mark.parametrize("command", [["serve", "{build}", "--port", "{port}"],
                                     ["triton", "{build}", "-o", "{tmp}/repo", "--serve", "--http-port", "{port}"]])
def test_a_port_in_use_is_one_line_naming_the_flag(demo_build, tmp_path, command):
    """serve and Triton both default to 8000: the second one started says so before loading anything."""
    from click.testing import CliRunner

    from dsv3_export.cli.main import main
    from tests.helpers import assert_clean_error

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        args = [a.format(build=demo_build, port=port, tmp=tmp_path) for a in command]
        r = CliRunner().invoke(main, args)
    assert_clean_error(r, f"{port}: 127.0.0.1:{port} is not free")
    assert not (tmp_path / "repo").exists()
