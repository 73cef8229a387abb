"""The real tritonserver (the nvidia-pytriton wheel's binary, python backend) over a CPU repository
of the demo build, started by `dsv3-export triton ... --serve` on 127.0.0.1 and free ports, and
stopped by SIGTERM to that process: Triton's generate / generate_stream endpoints and gRPC streaming
against Engine.generate on the same prompts."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from dsv3_export import engines
from dsv3_export.core.errors import ExportError
from dsv3_export.deploy.tritonserver import STOP_GRACE_S, find_tritonserver
from tests.helpers import ROOT, run_together

STARTUP_TRIES, STARTUP_PAUSE_S = 600, 0.5  # at most 5 minutes (the first run makes the stub's environment)
TIMEOUT = httpx.Timeout(120.0)
CLIENT_TIMEOUT_S = 3  # the guard's: headers, then the body, within this


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Every process below pid (from /proc), e.g. tritonserver and its python stubs."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Server:
    proc: subprocess.Popen
    http: str
    grpc: str
    log: Path

    def generate(self, body: dict, stream: bool = False) -> httpx.Response:
        path = "generate_stream" if stream else "generate"
        return httpx.post(f"{self.http}/v2/models/dsv3/{path}", json=body, timeout=TIMEOUT)

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.http}/v2/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


def start_triton(build: Path, folder: Path) -> Server:
    """`dsv3-export triton BUILD --serve` on free loopback ports, ready (skips without tritonserver)."""
    try:
        find_tritonserver()
    except ExportError as e:
        pytest.skip(f"no tritonserver binary here: {e}")
    http, grpc = free_port(), free_port()
    log = folder / "server.log"
    cmd = [sys.executable, "-m", "dsv3_export.cli.main", "triton", str(build), "-o", str(folder / "repo"),
           "--threads", "1", "--serve", "--http-port", str(http), "--grpc-port", str(grpc),
           "--client-timeout", str(CLIENT_TIMEOUT_S)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    s = Server(proc, f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc}", log)
    deadline = time.monotonic() + STARTUP_TRIES * STARTUP_PAUSE_S
    for _ in range(STARTUP_TRIES):
        if proc.poll() is not None or s.ready() or time.monotonic() > deadline:
            break
        time.sleep(STARTUP_PAUSE_S)
    if not s.ready():
        proc.kill()
        proc.wait(30)
        raise AssertionError(f"tritonserver did not get ready (exit {proc.poll()}):\n{log.read_text()[-4000:]}")
    return s


def stop_triton(s: Server) -> None:
    """SIGTERM by PID: exit 0, and none of its processes left."""
    below = descendants(s.proc.pid)
    assert below, "tritonserver and its stubs should run below the CLI"
    s.proc.send_signal(signal.SIGTERM)
    try:
        rc = s.proc.wait(STOP_GRACE_S + 15)
    except subprocess.TimeoutExpired:
        s.proc.kill()
        rc = None
    deadline = time.monotonic() + 15
    for _ in range(75):  # the stubs exit with the server: at most 15 s
        if not any(alive(p) for p in below) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    left = [p for p in below if alive(p)]
    assert rc == 0 and not left, f"exit {rc}, left running {left}:\n{s.log.read_text()[-4000:]}"


@pytest.fixture(scope="module")
def server(pipeline_build, tmp_path_factory):
    s = start_triton(pipeline_build, tmp_path_factory.mktemp("triton"))
    yield s
    stop_triton(s)


@pytest.fixture(scope="module")
def engine(pipeline_build):
    return engines.load(pipeline_build, threads=1)


def events(response: httpx.Response) -> list[dict]:
    """The JSON of each server-sent event of generate_stream."""
    assert response.status_code == 200, response.text
    return [json.loads(line[len("data:"):]) for line in response.text.splitlines() if line.startswith("data:")]


def test_generate_gives_engine_generate_text(server, engine):
    expected = engine.generate("def main(", max_new_tokens=12)
    r = server.generate({"text_input": "def main(", "max_tokens": 12})
    assert r.status_code == 200, r.text
    assert r.json()["text_output"] == expected.text
    sampled = engine.generate("import os\n", max_new_tokens=12, temperature=0.8, top_p=0.9, seed=11)
    r = server.generate({"text_input": "import os\n", "max_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": 11})
    assert r.json()["text_output"] == sampled.text
    full = engine.generate("class A:", max_new_tokens=16).text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    r = server.generate({"text_input": "class A:", "max_tokens": 16, "stop": [stop]})
    assert r.json()["text_output"] == full[:full.index(stop)]


def test_generate_applies_min_p(server, engine):
    """min_p reaches the model through Triton's own JSON: the tokens Engine.generate gives with it,
    and min_p = 1 keeps only the most likely token (the greedy text at a high temperature)."""
    kw = {"text_input": "def main(", "max_tokens": 12, "temperature": 1.5}
    with_min_p = engine.generate("def main(", max_new_tokens=12, temperature=1.5, min_p=0.3, seed=5).text
    assert server.generate({**kw, "min_p": 0.3, "seed": 5}).json()["text_output"] == with_min_p
    greedy = engine.generate("def main(", max_new_tokens=12).text
    assert all(server.generate({**kw, "min_p": 1.0, "seed": s}).json()["text_output"] == greedy for s in (1, 2))
    r = server.generate({**kw, "min_p": 1.5})
    assert r.status_code == 400 and "min_p must be in [0.0, 1.0], got 1.5" in r.text, r.text


def test_generate_stream_sends_one_event_per_token(server, engine):
    expected = engine.generate("import sys\n", max_new_tokens=16)
    got = events(server.generate({"text_input": "import sys\n", "max_tokens": 16, "stream": True}, stream=True))
    assert all("error" not in e for e in got), got
    assert len(got) == len(expected.ids) - (expected.finish_reason == "stop")  # a stop token sends no text
    assert "".join(e["text_output"] for e in got) == expected.text


def test_grpc_streaming(server, engine):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    expected = engine.generate("for i in", max_new_tokens=10)
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        inputs = []
        for name, value, dtype in (("text_input", np.array([b"for i in"], np.object_), "BYTES"),
                                   ("max_tokens", np.array([10], np.int32), "INT32"),
                                   ("stream", np.array([True]), "BOOL")):
            inputs.append(grpcclient.InferInput(name, list(value.shape), dtype))
            inputs[-1].set_data_from_numpy(value)
        client.async_stream_infer("dsv3", inputs, request_id="1", enable_empty_final_response=True)
        pieces = []
        for _ in range(len(expected.ids) + 2):  # the tokens' responses, then the final flag
            result, error = answers.get(timeout=120)
            assert error is None, error
            out = result.as_numpy("text_output")
            if out is not None:
                pieces.append(out.reshape(-1)[0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        assert "".join(pieces) == expected.text
        assert len(pieces) == len(expected.ids) - (expected.finish_reason == "stop")
    finally:
        client.stop_stream()
        client.close()


def test_eight_concurrent_sequences(server, engine):
    texts = ["import sys\n", "def f(x):\n    return", "class A(object):", "for i in range(10):\n",
             "# Copyright", "x = [1, 2,", "while True:\n    if", "from collections import"]
    expected = [engine.generate(t, max_new_tokens=20).text for t in texts]
    def one(i):
        r = server.generate({"text_input": texts[i], "max_tokens": 20})
        return r.json().get("text_output", r.text)

    assert run_together(one, len(texts), timeout=180) == expected


@pytest.mark.parametrize("body, field", [
    ({"text_input": "x", "max_tokens": -1}, "max_tokens"), ({"text_input": "x", "temperature": -1.0}, "temperature"),
    ({"text_input": "x", "top_p": 0.0}, "top_p"), ({"text_input": "x", "max_tokens": 100_000}, "max_tokens"),
    ({"max_tokens": 3}, "text_input"),
])
def test_a_bad_request_gets_an_error_naming_the_field(server, body, field):
    r = server.generate(body)
    assert r.status_code == 400 and field in r.json()["error"], r.text


def test_a_malformed_request_gets_tritons_error_and_the_server_keeps_serving(server, engine):
    r = httpx.post(f"{server.http}/v2/models/dsv3/generate", content=b'{"text_input": "x", "max_tokens": 3',
                   headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code >= 400 and "error" in r.json()
    r = server.generate({"text_input": "x", "max_tokens": "three"})
    assert r.status_code >= 400 and "error" in r.json()
    assert server.ready()
    r = server.generate({"text_input": "def main(", "max_tokens": 4})
    assert r.json()["text_output"] == engine.generate("def main(", max_new_tokens=4).text


@pytest.mark.parametrize("ids", [[[-7]], [[10**9]]], ids=["negative", "beyond-vocab"])
def test_a_stage_model_refuses_token_ids_out_of_range(server, pipeline_build, ids):
    """ONNX Runtime's Gather would take -7 as an index from the end (token 4089): the stage model
    refuses it with the range instead, and keeps serving."""
    from dsv3_export.core.build_dir import read_manifest, stage_graphs

    manifest = read_manifest(pipeline_build)
    first = stage_graphs(manifest)[0]
    inputs = [{"name": "input_ids", "shape": [1, 1], "datatype": "INT64", "data": ids[0]},
              {"name": "cache_lengths", "shape": [1], "datatype": "INT64", "data": [0]}]
    width = manifest.config["kv_lora_rank"] + manifest.config["qk_rope_head_dim"]
    for layer in range(*first["layers"]):
        inputs.append({"name": f"past_latent.{layer}", "shape": [1, 1, width], "datatype": "FP32",
                       "data": [0.0] * width})
    r = httpx.post(f"{server.http}/v2/models/dsv3_stage0/infer", json={"inputs": inputs}, timeout=TIMEOUT)
    assert r.status_code == 400 and "out of range" in r.json()["error"], r.text
    assert server.ready()


def test_a_missing_binary_is_one_line_saying_how_to_get_it(monkeypatch, tmp_path):
    import importlib.util

    from dsv3_export.deploy import tritonserver

    monkeypatch.setenv("DSV3_TRITONSERVER", str(tmp_path / "nowhere"))
    with pytest.raises(ExportError, match="DSV3_TRITONSERVER=.*no executable tritonserver"):
        find_tritonserver()
    monkeypatch.delenv("DSV3_TRITONSERVER")
    real = importlib.util.find_spec
    monkeypatch.setattr(tritonserver.importlib.util, "find_spec", lambda name: None if name == "pytriton" else real(name))
    with pytest.raises(ExportError, match=r"pip install --no-deps nvidia-pytriton==0\.7\.0") as e:
        find_tritonserver()
    assert "\n" not in str(e.value)


def test_the_command_listens_on_loopback_only(tmp_path):
    from dsv3_export.deploy.tritonserver import backend_directory, command, server_environment

    try:
        inst = find_tritonserver()
    except ExportError as e:
        pytest.skip(f"no tritonserver binary here: {e}")
    backends = backend_directory(inst, tmp_path)
    assert (backends / "python" / "triton_python_backend_stub").exists()
    cmd = command(inst, tmp_path / "repo", backends, "127.0.0.1", 8000, 8001, None)
    assert "--http-address=127.0.0.1" in cmd and "--grpc-address=127.0.0.1" in cmd and "--allow-metrics=false" in cmd
    env = server_environment(inst, tmp_path / "bin")
    assert env["PATH"].startswith(str(tmp_path / "bin")) and all(str(p) in env["LD_LIBRARY_PATH"] for p in inst.libs)
