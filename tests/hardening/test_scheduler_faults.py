"""The scheduler finishes every request it has taken on, whatever raises and wherever in a
request's life (prefill, joining the batch, a decode step, sampling, the token callback): the
requests in that step end with an error and a log line, the others and later ones are served."""

from __future__ import annotations

import logging

import pytest

from dsv3_export import engines
from dsv3_export.engines import scheduler as scheduler_module
from dsv3_export.engines.sampling import SamplingParams
from dsv3_export.engines.scheduler import Scheduler

WAIT_S = 120


@pytest.fixture(scope="module")
def engine(tiny_build):
    return engines.load(tiny_build, threads=1)


class FaultyEngine:
    """The engine, with `fail(call)` deciding per step_in_place call (prefill: S > 1) whether it raises."""

    def __init__(self, engine, fail):
        self._engine, self.fail = engine, fail

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def step_in_place(self, ids, lengths, buffers):
        if self.fail(ids):
            raise RuntimeError("injected fault")
        return self._engine.step_in_place(ids, lengths, buffers)


def params(n=6, **kw):
    return SamplingParams(max_tokens=n, stop=frozenset(), **kw)


def solo(engine, prompt, n=6):
    return engine.generate(prompt, max_new_tokens=n, stop=[]).ids


def finish_all(sched, requests):
    """Run the scheduler in its thread until every request has finished (none may be stranded)."""
    sched.start()
    try:
        for r in requests:
            assert r.wait(WAIT_S), f"request {r.id} was stranded"
    finally:
        sched.stop()


@pytest.mark.parametrize("stage", ["prefill", "decode"])
def test_a_failing_graph_call_fails_its_requests_alone(engine, stage, caplog):
    calls = {"n": 0}

    def fail(ids):  # the first call of that kind raises, later ones run
        kind = "prefill" if ids.shape[1] > 1 else "decode"
        if kind == stage and calls["n"] == 0:
            calls["n"] += 1
            return True
        return False

    sched = Scheduler(FaultyEngine(engine, fail), max_batch=2, prefill_chunk=64)
    first = sched.submit([0, 5, 9, 14], params())
    later = None
    with caplog.at_level(logging.ERROR, logger=scheduler_module.__name__):
        sched.start()
        try:
            assert first.wait(WAIT_S)
            later = sched.submit([0, 7, 3], params())
            assert later.wait(WAIT_S)
        finally:
            sched.stop()
    assert first.finish_reason == "error" and "RuntimeError: injected fault" in first.error
    assert later.finish_reason == "length" and later.tokens == solo(engine, [0, 7, 3])
    assert any("injected fault" in r.getMessage() or r.exc_info for r in caplog.records)
    assert sched.idle and not sched.running


def test_no_memory_for_the_cache_fails_that_request_alone(engine, monkeypatch):
    """BatchCache.ensure raising MemoryError as a request joins the batch (serve --max-batch 100000)."""
    sched = Scheduler(engine, max_batch=2, prefill_chunk=64)
    real = sched.cache.ensure

    def ensure(positions):
        if positions > 500:
            raise MemoryError(f"cannot allocate the cache for {positions} positions")
        return real(positions)

    monkeypatch.setattr(sched.cache, "ensure", ensure)
    big = sched.submit([0, 5, 6], params(n=900))
    small = sched.submit([0, 8, 2], params())
    finish_all(sched, [big, small])
    assert big.finish_reason == "error" and "MemoryError" in big.error
    assert small.finish_reason == "length" and small.tokens == solo(engine, [0, 8, 2])


def test_a_failing_sampler_or_callback_fails_that_request_alone(engine, monkeypatch):
    real = scheduler_module.sample

    def sample(logits, rng, p):
        if p.seed == 666:
            raise ValueError("injected sampler fault")
        return real(logits, rng, p)

    monkeypatch.setattr(scheduler_module, "sample", sample)
    sched = Scheduler(engine, max_batch=3, prefill_chunk=64)

    def bad_callback(request, token):
        raise KeyError("injected callback fault")

    broken_sampler = sched.submit([0, 5, 9], params(seed=666))
    broken_callback = sched.submit([0, 4, 4], params(), on_token=bad_callback)
    fine = sched.submit([0, 11, 2, 7], params())
    finish_all(sched, [broken_sampler, broken_callback, fine])
    assert broken_sampler.finish_reason == "error" and "ValueError" in broken_sampler.error
    assert broken_callback.finish_reason == "error" and "KeyError" in broken_callback.error
    assert fine.finish_reason == "length" and fine.tokens == solo(engine, [0, 11, 2, 7])


def test_engine_generate_reports_the_fault_as_one_error(engine, monkeypatch):
    """Through Engine.generate (the scheduler run in the caller's thread): one ExportError, no hang."""
    from dsv3_export.core.errors import ExportError

    def boom(*a, **k):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(engine, "step_in_place", boom)
    with pytest.raises(ExportError, match="RuntimeError: injected fault"):
        engine.generate([[0, 5, 9], [0, 3]], max_new_tokens=4)


def test_a_batch_over_the_engines_limit_is_refused_at_start(engine):
    """A TensorRT engine's profiles cap the rows of one call: a scheduler asked for more would fail
    every live request at its first full decode step, so it refuses at once, naming both figures."""
    from dsv3_export.core.errors import ExportError
    from dsv3_export.engines.trt_profiles import max_batch

    profiles = [{"inputs": {"input_ids": {"min": [1, 1], "opt": [1, 64], "max": [2, 2048]}}},
                {"inputs": {"input_ids": {"min": [1, 1], "opt": [2, 1], "max": [4, 2]}}}]
    assert max_batch(profiles) == 4
    limited = FaultyEngine(engine, lambda ids: False)
    limited.max_batch = 4
    with pytest.raises(ExportError, match="max_batch 8 exceeds the 4 sequences"):
        Scheduler(limited, max_batch=8)
    assert Scheduler(limited, max_batch=4).max_batch == 4
    assert engine.max_batch is None  # ONNX Runtime: no limit
