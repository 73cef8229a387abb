"""deploy.llm without Triton: the fields' checks, stop strings, and the dsv3 model's generator over
the stage chain with each stage run here by ONNX Runtime (what the stage models do in Triton)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from dsv3_export import engines
from dsv3_export.core.build_dir import read_manifest, stage_graphs
from dsv3_export.deploy.llm import Generator, RequestError, Sink, parse_request
from dsv3_export.deploy.triton_repo import write_repository
from dsv3_export.engines.ort import CPU, session


def fields(**kw) -> dict[str, np.ndarray]:
    """Inputs as the python backend hands them over: arrays of one element, text as bytes."""
    types = {"max_tokens": np.int32, "top_k": np.int32, "seed": np.int64, "temperature": np.float32,
             "top_p": np.float32, "min_p": np.float32, "stream": np.bool_}
    out = {"text_input": np.array([b"def f("], dtype=np.object_)}
    for k, v in kw.items():
        if k in ("text_input", "stop"):
            out[k] = np.array([s.encode() for s in ([v] if isinstance(v, str) else v)], dtype=np.object_)
        else:
            out[k] = np.array([v], dtype=types[k])
    return out


@pytest.mark.parametrize("bad, field", [
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.01}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"seed": -1}, "seed"), ({"text_input": ""}, "text_input"),
    ({"min_p": 1.5}, "min_p"),
])
def test_bad_fields_are_named(bad, field):
    with pytest.raises(RequestError, match=field):
        parse_request(fields(**bad), eos=1)


@pytest.mark.parametrize("name,value", [("top_p", 1.5), ("min_p", -0.25), ("top_k", -2), ("temperature", -1.0)])
def test_bad_sampling_fields_have_the_wording_of_every_surface(name, value):
    """Triton's error is SamplingParams' own message, as the CLI's and the OpenAI server's."""
    from dsv3_export.engines.sampling import SamplingError, SamplingParams

    with pytest.raises(SamplingError) as own:
        SamplingParams(**{name: value})
    with pytest.raises(RequestError) as got:
        parse_request(fields(**{name: value}), eos=1)
    assert str(got.value) == str(own.value)


def test_every_sampling_field_is_a_model_input():
    from dsv3_export.deploy.llm import INPUT_NAMES
    from dsv3_export.engines.sampling import SamplingParams

    assert {f.name for f in SamplingParams.wire_fields()} <= set(INPUT_NAMES)


def test_fields_and_defaults():
    r = parse_request(fields(), eos=1)
    assert (r.prompt, r.params.max_tokens, r.params.temperature, r.params.stop, r.stream, r.stops) == (
        "def f(", 64, 0.0, frozenset({1}), False, ())
    r = parse_request(fields(max_tokens=5, temperature=0.7, top_p=0.9, top_k=3, seed=9, stop=["\n", ""],
                             stream=True), eos=None)
    assert (r.params.max_tokens, r.params.top_k, r.params.seed, r.params.stop, r.stream, r.stops) == (
        5, 3, 9, frozenset(), True, ("\n",))
    assert r.params.temperature == pytest.approx(0.7) and r.params.top_p == pytest.approx(0.9)
    with pytest.raises(RequestError, match="text_input is required"):
        parse_request({}, eos=1)
    with pytest.raises(RequestError, match="max_tokens must be one value"):
        parse_request({**fields(), "max_tokens": np.array([1, 2], np.int32)}, eos=1)


class Collect(Sink):
    def __init__(self):
        self.texts, self.errors, self.finals = [], [], 0
        self.done = threading.Event()

    def send(self, text, final=False):
        self.texts.append(text)
        if final:
            self.finals += 1
            self.done.set()

    def error(self, message):
        self.errors.append(message)
        self.done.set()

    def final(self):
        self.finals += 1
        self.done.set()


@pytest.fixture(scope="module")
def generator(pipeline_build, tmp_path_factory):
    """The dsv3 model's Generator over a written repository's files, each stage model replaced by
    its ONNX Runtime session here."""
    repo = tmp_path_factory.mktemp("llm") / "repo"
    write_repository(pipeline_build, repo)
    stages = stage_graphs(read_manifest(pipeline_build))
    sessions = {f"dsv3_stage{k}": session(pipeline_build, s["file"][:-5], providers=[CPU], threads=1)
                for k, s in enumerate(stages)}

    def call(model, feeds, outputs):
        return dict(zip(outputs, sessions[model].run(list(outputs), dict(feeds))))

    g = Generator(repo / "dsv3" / "1", call, max_batch=4)
    g.start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def engine(pipeline_build):
    return engines.load(pipeline_build, threads=1)


def run(generator, **kw) -> Collect:
    sink = Collect()
    generator.submit(fields(**kw), sink).join(120)
    assert sink.done.is_set() and not sink.errors, sink.errors
    return sink


def test_generator_gives_engine_generate_tokens(generator, engine):
    prompts = ["def main(", "import os\n", "class A:", "x = [1,"]
    expected = [engine.generate(p, max_new_tokens=10) for p in prompts]
    sinks = [Collect() for _ in prompts]
    threads = [generator.submit(fields(text_input=p, max_tokens=10), s) for p, s in zip(prompts, sinks)]
    for t in threads:
        t.join(120)
    assert [s.texts for s in sinks] == [[e.text] for e in expected]  # non-streamed: one response, final
    assert all(s.finals == 1 for s in sinks)
    streamed = run(generator, text_input="import os\n", max_tokens=10, stream=True)
    stop_token = expected[1].finish_reason == "stop"
    assert len(streamed.texts) == len(expected[1].ids) - stop_token  # one response a token
    assert "".join(streamed.texts) == expected[1].text and streamed.finals == 1
    sampled = engine.generate("def main(", max_new_tokens=10, temperature=0.9, top_k=20, seed=7)
    assert run(generator, text_input="def main(", max_tokens=10, temperature=0.9, top_k=20, seed=7).texts == [
        sampled.text]


def test_generator_applies_min_p(generator, engine):
    """min_p through the Triton model's fields: the same text as Engine.generate with the same
    min_p, and a min_p of 1 keeps only the most likely token: the greedy text, whatever the seed."""
    kw = dict(max_new_tokens=12, temperature=1.5, seed=11)
    with_min_p = engine.generate("def main(", **kw, min_p=0.3)
    assert run(generator, text_input="def main(", max_tokens=12, temperature=1.5, seed=11, min_p=0.3).texts == [
        with_min_p.text]
    greedy = engine.generate("def main(", max_new_tokens=12).text
    for seed in (1, 2, 3):
        assert run(generator, text_input="def main(", max_tokens=12, temperature=1.5, seed=seed,
                   min_p=1.0).texts == [greedy]


def test_generator_stop_strings_and_errors(generator, engine):
    full = engine.generate("class A:", max_new_tokens=16).text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert run(generator, text_input="class A:", max_tokens=16, stop=[stop]).texts == [full[:full.index(stop)]]
    streamed = run(generator, text_input="class A:", max_tokens=16, stop=[stop], stream=True)
    assert "".join(streamed.texts) == full[:full.index(stop)]
    with pytest.raises(RequestError, match="text_input: prompt .* exceeds the model's context"):
        generator.submit(fields(text_input="x", max_tokens=100_000), Collect())
    assert run(generator, text_input="x", max_tokens=2).texts  # still serving
