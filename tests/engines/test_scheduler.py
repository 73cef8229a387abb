"""Continuous batching (engines.scheduler): sequences of different lengths decoding together, joining
and leaving at any step, give each the tokens it gets alone; errors, cancellation, back-pressure,
per-request sampling, threads and asyncio."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from dsv3_export import engines
from dsv3_export.core.errors import ExportError
from dsv3_export.engines.sampling import SamplingParams
from dsv3_export.engines.scheduler import QueueFull, Scheduler


@pytest.fixture(scope="module")
def demo(demo_build):
    return engines.load(demo_build, threads=2)


@pytest.fixture(scope="module")
def tiny(tiny_build):
    return engines.load(tiny_build, threads=1)


def _prompts(engine, n: int, lo: int = 3, hi: int = 200) -> list[list[int]]:
    """n prompts of lengths spread over lo..hi: slices of real text through the build's tokenizer."""
    from dsv3_export.verification.lm_eval import real_text_ids

    text = real_text_ids(engine.build_dir / "tokenizer.json", engine.config.vocab_size, batch=1, seq=hi * n)[0]
    lengths = np.linspace(lo, hi, n).astype(int)
    return [[engine.config.bos_token_id or 0] + text[i * hi:i * hi + length - 1].tolist()
            for i, length in enumerate(lengths)]


def _alone(engine, prompts, params):
    out = []
    for p in prompts:
        s = Scheduler(engine, max_batch=1)
        r = s.submit(p, params)
        s.run()
        out.append(r.tokens)
    return out


GREEDY = SamplingParams(max_tokens=24)


def _staggered(engine, prompts, *, max_batch: int, prefill_chunk: int, every: int):
    """One new greedy request every `every` steps until all are in, stepping until idle."""
    s = Scheduler(engine, max_batch=max_batch, prefill_chunk=prefill_chunk)
    reqs, steps = [], 0
    while len(reqs) < len(prompts) or not s.idle:
        if len(reqs) < len(prompts) and steps % every == 0:
            reqs.append(s.submit(prompts[len(reqs)], GREEDY))
        s.step()
        steps += 1
        assert steps < 2000
    return s, reqs


def test_demo_16_prompts_together_equal_each_alone(demo):
    prompts = _prompts(demo, 16)
    assert min(map(len, prompts)) == 3 and max(map(len, prompts)) == 200
    s = Scheduler(demo, max_batch=16, prefill_chunk=512)
    reqs = [s.submit(p, GREEDY) for p in prompts]
    s.run()
    assert s.stats.largest_batch == 16
    assert [r.tokens for r in reqs] == _alone(demo, prompts, GREEDY)
    assert all(r.finish_reason in ("stop", "length") for r in reqs)


def test_several_prompts_prefill_in_one_call_as_they_would_alone(demo):
    # Prompts of 40, 30 and 12 tokens with room for all: one call of width 40 (two rows padded),
    # then nothing left to prefill; a budget of 64 fits one row of 40, so the next go one by one.
    prompts = [p[:n] for p, n in zip(_prompts(demo, 3, 40, 40), (40, 30, 12))]
    together = Scheduler(demo, max_batch=3, prefill_chunk=256)
    reqs = [together.submit(p, GREEDY) for p in prompts]
    together.run()
    assert together.stats.prefill_calls == 1 and together.stats.prefill_tokens == 82
    assert [r.tokens for r in reqs] == _alone(demo, prompts, GREEDY)
    narrow = Scheduler(demo, max_batch=3, prefill_chunk=64)
    for p in prompts:
        narrow.submit(p, GREEDY)
    narrow.run()
    assert narrow.stats.prefill_calls == 2  # 40 alone (2 x 40 > 64), then 30 and 12 at width 30


def test_demo_staggered_arrivals_equal_each_alone(demo):
    """One new request every 3 steps, 8 slots for 16 requests: sequences join and leave mid-batch,
    prompts are prefilled in chunks of 64 tokens while others decode."""
    prompts = _prompts(demo, 16)
    s, reqs = _staggered(demo, prompts, max_batch=8, prefill_chunk=64, every=3)
    assert 1 < s.stats.largest_batch <= 8
    assert [r.tokens for r in reqs] == _alone(demo, prompts, GREEDY)


@pytest.fixture(scope="module")
def demo_per_expert(tmp_path_factory):
    """The demo model with `--moe per-expert` (each expert its own MatMuls over its tokens)."""
    from dsv3_export.core.build_options import BuildOptions
    from dsv3_export.pipeline.build import build

    out = tmp_path_factory.mktemp("demo-per-expert")
    assert build("demo", out, BuildOptions(verify=False, force=True, moe_form="per-expert")).moe_form == "per-expert"
    return engines.load(out, threads=2)


def test_per_expert_build_staggered_equals_each_alone_and_the_fused_build(demo, demo_per_expert):
    """How many rows each expert gets changes with what shares the step; the tokens must not: 8
    staggered requests (6 slots, prompt chunks of 64) against each alone, and against the default
    (fused) build."""
    prompts = _prompts(demo_per_expert, 8)
    s, reqs = _staggered(demo_per_expert, prompts, max_batch=6, prefill_chunk=64, every=2)
    assert s.stats.largest_batch > 1
    alone = _alone(demo_per_expert, prompts, GREEDY)
    assert [r.tokens for r in reqs] == alone == _alone(demo, prompts, GREEDY)


def test_engine_generate_batches_prompts_of_any_length(tiny):
    prompts = [[0, 5, 7], [0] + list(range(10, 60)), [0, 99]]
    batch = tiny.generate(prompts, max_new_tokens=12)
    assert batch.ids == [tiny.generate(p, max_new_tokens=12).ids for p in prompts]
    assert batch.stats.batch == 3 and batch.stats.prompt_tokens == sum(map(len, prompts))


def test_a_request_over_the_context_is_refused_and_the_others_finish(tiny):
    s = Scheduler(tiny, max_batch=4)
    ok = s.submit([0, 5, 7], GREEDY)
    with pytest.raises(ExportError, match="max_seq_len 1024"):
        s.submit([0] * 1000, SamplingParams(max_tokens=100))
    with pytest.raises(ExportError, match="out of range"):
        s.submit([0, 512], GREEDY)
    s.run()
    assert ok.tokens == _alone(tiny, [[0, 5, 7]], GREEDY)[0]


def test_a_cancelled_slot_is_reused_within_one_step(tiny):
    s = Scheduler(tiny, max_batch=2)
    a, b = s.submit([0, 5], SamplingParams(max_tokens=200)), s.submit([0, 6], SamplingParams(max_tokens=200))
    waiting = s.submit([0, 7, 8], GREEDY)
    s.step()
    s.step()
    assert len(s.running) == 2 and waiting in s.waiting
    a.cancel()
    s.step()  # a leaves, waiting is admitted and prefilled in the same step
    assert a.finish_reason == "cancelled" and a not in s.running
    assert waiting in s.running and len(s.running) == 2
    s.run()
    assert waiting.tokens == _alone(tiny, [[0, 7, 8]], GREEDY)[0]
    assert b.finish_reason in ("stop", "length")


def test_back_pressure_when_the_queue_is_full(tiny):
    s = Scheduler(tiny, max_batch=1, max_waiting=2)
    s.submit([0, 1], GREEDY)
    s.submit([0, 2], GREEDY)
    with pytest.raises(QueueFull, match="max_waiting 2"):
        s.submit([0, 3], GREEDY)


def test_sampled_tokens_depend_on_the_seed_not_on_the_batch(tiny):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    alone = _alone(tiny, [[0, 11, 12]], params)[0]
    s = Scheduler(tiny, max_batch=4)
    others = [s.submit([0, 20 + i], SamplingParams(max_tokens=30, temperature=0.8, seed=i)) for i in range(3)]
    mine = s.submit([0, 11, 12], params)
    s.run()
    assert mine.tokens == alone and all(o.tokens for o in others)
    assert _alone(tiny, [[0, 11, 12]], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=8))[0] != alone


def test_the_cache_is_allocated_once_for_the_longest_request(tiny):
    s = Scheduler(tiny, max_batch=2)
    r = s.submit([0, 5, 6], SamplingParams(max_tokens=300, stop=frozenset()))
    s.step()
    buffers, capacity = [id(b) for b in s.cache.buffers], s.cache.capacity
    assert capacity >= 303
    s.run()
    assert len(r.tokens) == 300 and [id(b) for b in s.cache.buffers] == buffers and s.cache.capacity == capacity


def test_threads_and_asyncio(tiny):
    s = Scheduler(tiny, max_batch=4)
    s.start()
    try:
        want = _alone(tiny, [[0, 5, 7], [0, 9]], GREEDY)
        got = {}

        def client(i, prompt):
            got[i] = list(s.submit(prompt, GREEDY))

        threads = [threading.Thread(target=client, args=(i, p)) for i, p in enumerate([[0, 5, 7], [0, 9]])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [got[0], got[1]] == want

        async def stream():
            return [tok async for tok in s.submit([0, 5, 7], GREEDY).stream()]

        assert asyncio.run(asyncio.wait_for(stream(), 60)) == want[0]
    finally:
        s.stop()


def test_naive_builds_are_refused(tiny):
    class Old:
        buffered, build_dir = False, "old"

    with pytest.raises(ExportError, match="rebuild it"):
        Scheduler(Old())
