"""A real `dsv3-export serve` process driven by the official `openai` client (and httpx where the
client hides the HTTP status or must send something malformed)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.helpers import run_together

openai = pytest.importorskip("openai")

MODEL = "demo-build"  # the model id: the build directory's name (tests/conftest.py: demo_build)


def client(server, **kw) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key or "unused", max_retries=0,
                         timeout=120, **kw)


def wait_for(predicate, timeout: float = 10.0, pause: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(pause)
    return predicate()


def test_models_and_health(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_completion(server, engine):
    c = client(server)
    r = c.completions.create(model=MODEL, prompt="def main(", max_tokens=8, temperature=0)
    choice = r.choices[0]
    ids = engine.tokenize("def main(")
    expected = engine.generate(ids, max_new_tokens=8)
    assert choice.model_extra["token_ids"] == expected.ids
    assert choice.text == expected.text and choice.finish_reason == expected.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(expected.ids))
    echoed = c.completions.create(model=MODEL, prompt="def main(", max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == "def main(" + expected.text


def test_completion_streamed(server, engine):
    c = client(server)
    ids = engine.tokenize("import os\n")
    expected = engine.generate(ids, max_new_tokens=12)
    chunks = list(c.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    token_chunks = [ch for ch in chunks if ch.choices and ch.choices[0].model_extra.get("token_ids")]
    assert [ch.choices[0].model_extra["token_ids"] for ch in token_chunks] == [[t] for t in expected.ids]  # one a token
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == expected.text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [expected.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.ids)
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_stop_string_and_logprobs(server):
    c = client(server)
    full = c.completions.create(model=MODEL, prompt="class Foo:\n", max_tokens=24, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = full[:full.index(stop)]
    r = c.completions.create(model=MODEL, prompt="class Foo:\n", max_tokens=24, temperature=0, stop=[stop],
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model=MODEL, prompt="class Foo:\n", max_tokens=24, temperature=0, stop=stop,
                                    stream=True, extra_body={"ignore_eos": True})
    chunks = list(streamed)
    assert "".join(ch.choices[0].text for ch in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"
    lp = c.completions.create(model=MODEL, prompt="x = ", max_tokens=4, temperature=0, logprobs=3).choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(v <= 0 for v in lp.token_logprobs)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):  # greedy: the chosen token is the most likely
        assert len(top) <= 3 and max(top.values()) == pytest.approx(chosen)


def test_chat(server, engine):
    c = client(server)
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A loop"}]
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    prompt = engine.tokenize("<|begin▁of▁sentence|>You write Python.<｜User｜>A loop<｜Assistant｜>", add_bos=False)
    expected = engine.generate(prompt, max_new_tokens=10)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(expected.ids)
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.ids)
    lp = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0, logprobs=True,
                                   top_logprobs=2).choices[0].logprobs
    assert len(lp.content) == 3 and all(len(t.top_logprobs) == 2 for t in lp.content)


def test_eight_concurrent_greedy_requests_match_generate_alone(server, engine):
    texts = ["import sys\n", "def f(x):\n    return", "class A(object):", "for i in range(10):\n",
             "# Copyright", "x = [1, 2,", "while True:\n    if", "from collections import"]
    prompts = [engine.tokenize(t) for t in texts]
    expected = [engine.generate(p, max_new_tokens=20).ids for p in prompts]
    def one(i):
        r = client(server).completions.create(model=MODEL, prompt=prompts[i], max_tokens=20, temperature=0)
        return r.choices[0].model_extra["token_ids"]

    assert run_together(one, len(prompts)) == expected
    assert server.metric("dsv3_batch_size_bucket", 'le="8.0"') > server.metric("dsv3_batch_size_bucket", 'le="1.0"')


def test_cancelled_stream_frees_its_slot(server):
    before = server.metric("dsv3_sequences_finished_total", 'reason="cancelled"')
    stream = client(server).completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=1500, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    for _ in range(3):
        next(it)
    assert server.metric("dsv3_running_sequences") == 1
    stream.close()  # the client goes away
    assert wait_for(lambda: server.metric("dsv3_running_sequences") == 0, timeout=10)
    assert wait_for(lambda: server.metric("dsv3_sequences_finished_total", 'reason="cancelled"') == before + 1)
    assert client(server).completions.create(model=MODEL, prompt="ok", max_tokens=2).choices[0].finish_reason


BAD = [  # (body, status, param)
    ({"model": "gpt-4", "prompt": "x"}, 400, "model"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": [1, 2, 999999]}, 400, "prompt"),
    ({"model": MODEL, "prompt": []}, 400, "prompt"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "stop_token_ids": [10 ** 6]}, 400, "stop_token_ids"),
    ({"model": MODEL, "prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "x", "min_p": 2}, 400, "min_p"),
    ({"model": MODEL, "prompt": "x", "top_k": -2}, 400, "top_k"),
    ({"model": MODEL, "prompt": "x", "seed": -1}, 400, "seed"),
]


@pytest.mark.parametrize("body, status, param", BAD, ids=[p for _, _, p in BAD])
def test_bad_request_names_the_field(server, body, status, param):
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["code"] is None and err["message"]
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "ok", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("name,value", [("top_p", 1.5), ("min_p", -0.25), ("top_k", -2), ("temperature", -1.0)])
def test_bad_sampling_fields_have_the_wording_of_every_surface(server, name, value):
    """The 400's message is SamplingParams' own, the one the CLI and Triton print."""
    from dsv3_export.engines.sampling import SamplingError, SamplingParams

    with pytest.raises(SamplingError) as own:
        SamplingParams(**{name: value})
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", name: value}, timeout=30)
    assert r.status_code == 400 and r.json()["error"] == {"message": str(own.value), "type": "invalid_request_error",
                                                          "param": name, "code": None}


def test_min_p(server, engine):
    """min_p as an extra field of the official client: the same tokens as Engine.generate with it;
    min_p = 1 keeps only the most likely token (greedy tokens whatever the seed, where plain
    sampling at that temperature leaves greedy)."""
    c = client(server)
    ids = engine.tokenize("def main(")

    def sampled(seed, **extra):
        return c.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=1.5, seed=seed,
                                    extra_body={"ignore_eos": True, **extra}).choices[0].model_extra["token_ids"]

    expected = engine.generate(ids, max_new_tokens=12, temperature=1.5, seed=4, min_p=0.3, stop=[]).ids
    assert sampled(4, min_p=0.3)[:len(expected)] == expected
    greedy = c.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].model_extra["token_ids"]
    assert all(sampled(seed, min_p=1.0) == greedy for seed in (1, 2, 3))
    assert any(sampled(seed) != greedy for seed in (1, 2, 3))


def test_presence_and_frequency_penalties_by_hand(server, engine):
    """The OpenAI penalties act: greedy tokens equal a greedy decoding with the penalties applied by
    hand to the engine's own logits, and differ from plain greedy."""
    import numpy as np

    from dsv3_export.engines.sampling import SamplingParams, apply_penalties

    prompt, n = engine.tokenize("def main():\n    "), 24
    params = SamplingParams(presence_penalty=1.5, frequency_penalty=0.8)
    by_hand: list[int] = []
    for _ in range(n):
        logits, _, _ = engine.forward(np.array([prompt + by_hand]))
        by_hand.append(int(np.argmax(apply_penalties(logits[0, -1], params, prompt, by_hand))))
    r = client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, presence_penalty=1.5,
                                          frequency_penalty=0.8, extra_body={"ignore_eos": True})
    got = r.choices[0].model_extra["token_ids"]
    plain = engine.generate(prompt, max_new_tokens=n, stop=[]).ids
    assert got == by_hand and got != plain


@pytest.mark.parametrize("field,value", [("logit_bias", {"5": 10}), ("response_format", {"type": "json_object"}),
                                         ("tools", []), ("suffix", "x")])
def test_a_field_the_server_does_not_support_is_refused(server, field, value):
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1, field: value}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert "is not supported" in r.json()["error"]["message"]


def test_bad_chat_and_body(server):
    url = f"{server.url}/v1/chat/completions"
    r = httpx.post(url, json={"model": MODEL, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(url, json={"model": MODEL, "messages": [{"role": "tool", "content": "x"}]})  # raise_exception
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(url, content=b'{"model": "demo-build", "messages": [', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(url, content=b"{" + b" " * (2 << 20) + b"}", headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                               temperature=-1)
    assert e.value.body["param"] == "temperature"
    assert httpx.get(f"{server.url}/v1/nothing").status_code == 404
    assert client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                  max_tokens=2).choices[0].message.content is not None


def test_api_key_and_full_queue(small_server):
    url = f"{small_server.url}/v1/completions"
    assert httpx.post(url, json={"prompt": "x"}).status_code == 401
    assert httpx.post(url, json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{small_server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{small_server.url}/health").status_code == 200  # health and metrics stay open
    # one slot and one waiting place: two long streams hold them, a third request answers 429
    body = {"prompt": [5, 6], "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with httpx.Client(headers=small_server.headers(), timeout=60) as h:
        with h.stream("POST", url, json=body) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the connection (a disconnect)
            next(lines)
            with h.stream("POST", url, json=body) as second:
                assert wait_for(lambda: small_server.metric("dsv3_waiting_sequences") == 1)
                r = h.post(url, json={"prompt": "x", "max_tokens": 1})
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["type"] == "rate_limit_error"
                assert second.status_code == 200
    assert wait_for(lambda: small_server.metric("dsv3_running_sequences") == 0
                    and small_server.metric("dsv3_waiting_sequences") == 0, timeout=15)
    r = httpx.post(url, json={"prompt": "x", "max_tokens": 1}, headers=small_server.headers())
    assert r.status_code == 200
    metrics = httpx.get(f"{small_server.url}/metrics").text
    assert 'dsv3_requests_total{endpoint="/v1/completions",status="429"} 1.0' in metrics
    assert 'dsv3_requests_total{endpoint="/v1/completions",status="401"} 2.0' in metrics


def test_memory_stays_flat(server):
    """200 small requests after a warm-up: the server's RSS grows by at most 5 %."""
    body = {"model": MODEL, "prompt": [7, 8, 9, 10], "max_tokens": 2, "temperature": 0}
    with httpx.Client(timeout=30) as h:
        for _ in range(50):
            assert h.post(f"{server.url}/v1/completions", json=body).status_code == 200
        warm = server.rss_kib()
        for i in range(200):
            b = {**body, "stream": True} if i % 2 else body
            assert h.post(f"{server.url}/v1/completions", json=b).status_code == 200
        after = server.rss_kib()
    assert after <= warm * 1.05, f"RSS {warm} KiB after warm-up -> {after} KiB after 200 requests"
    print(f"RSS after warm-up {warm} KiB, after 200 requests {after} KiB ({(after - warm) / warm:+.2%})")


def test_sigterm_lets_a_running_request_finish(demo_build, tmp_path):
    from tests.server.conftest import start_server, stop_server

    s = start_server(demo_build, tmp_path / "server.log")
    got = {}

    def stream():
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": [5, 6], "max_tokens": 150, "stream": True,
                                                         "ignore_eos": True}, timeout=60)
        got["events"] = [json.loads(line[6:]) for line in r.text.splitlines()
                         if line.startswith("data: ") and line != "data: [DONE]"]
        got["done"] = r.text.rstrip().endswith("data: [DONE]")

    t = threading.Thread(target=stream)
    t.start()
    assert wait_for(lambda: s.metric("dsv3_running_sequences") == 1, timeout=10)
    rc = stop_server(s)
    t.join(60)
    assert rc == 0, s.log.read_text()[-3000:]
    assert got["done"] and got["events"][-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(e["choices"][0].get("token_ids", [])) for e in got["events"]) == 150
