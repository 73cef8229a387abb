"""engines.stages: a `--stages N` build runs as the one-graph engine does, bit for bit on the demo model."""

from __future__ import annotations

import numpy as np

from dsv3_export import engines
from dsv3_export.core.build_dir import main_io, read_manifest
from dsv3_export.engines.sampling import SamplingParams
from dsv3_export.engines.scheduler import Scheduler
from dsv3_export.engines.stages import StagedSession
from tests.helpers import rel_max_err


def test_chained_contract_is_the_one_graph_contract(staged_demo_build, demo_build):
    staged, whole = engines.load(staged_demo_build), engines.load(demo_build)
    assert isinstance(staged.session, StagedSession) and len(staged.session.sessions) == 2
    assert [i.name for i in staged.session.get_inputs()] == [i.name for i in whole.session.get_inputs()]
    assert [o.name for o in staged.session.get_outputs()] == [o.name for o in whole.session.get_outputs()]
    io = main_io(read_manifest(staged_demo_build))
    assert [i["name"] for i in io["inputs"]] == [i.name for i in whole.session.get_inputs()]


def test_forward_equals_the_one_graph_engine(staged_demo_build, demo_build):
    staged, whole = engines.load(staged_demo_build), engines.load(demo_build)
    ids = np.random.default_rng(0).integers(2, whole.config.vocab_size, (2, 11))
    past_s, past_w = staged.empty_past(2), whole.empty_past(2)
    for step in range(4):  # a prefill, then decode steps on each engine's own cache
        ls, hs, past_s = staged.forward(ids, past_s)
        lw, hw, past_w = whole.forward(ids, past_w)
        assert rel_max_err(ls, lw) <= 1e-5 and rel_max_err(hs, hw) <= 1e-5, step
        assert all(rel_max_err(a, b) <= 1e-5 for a, b in zip(past_s, past_w)), step
        ids = lw[:, -1:].argmax(-1)


def test_run_equals_run_in_place(staged_demo_build):
    staged = engines.load(staged_demo_build)
    n = staged.n_layers
    ids = np.random.default_rng(1).integers(2, staged.config.vocab_size, (3, 5)).astype(np.int64)
    lengths = np.array([0, 2, 7], np.int64)
    buffers = [np.random.default_rng(i).standard_normal((3, 16, *staged.cache_shape)).astype(np.float32)
               for i in range(n)]
    feeds = {"input_ids": ids, "cache_lengths": lengths, **{f"past_latent.{i}": b.copy() for i, b in enumerate(buffers)}}
    out = dict(zip([o.name for o in staged.session.get_outputs()], staged.session.run(None, feeds)))
    logits, hidden = staged.step_in_place(ids, lengths, buffers)
    assert np.array_equal(logits, out["logits"]) and np.array_equal(hidden, out["hidden_states"])
    assert all(np.array_equal(buffers[i], out[f"present_latent.{i}"]) for i in range(n))


def test_scheduler_over_stages_gives_each_prompt_its_solo_tokens(staged_demo_build, demo_build):
    staged, whole = engines.load(staged_demo_build), engines.load(demo_build)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(2, whole.config.vocab_size, n).tolist() for n in (3, 17, 40, 9)]
    sched = Scheduler(staged, max_batch=4)
    eos = frozenset({whole.config.eos_token_id})  # Engine.generate stops at EOS
    reqs = [sched.submit(p, SamplingParams(max_tokens=12, stop=eos)) for p in prompts]
    sched.run()
    for p, r in zip(prompts, reqs):
        solo = whole.generate(p, max_new_tokens=12, add_bos=False)
        assert r.tokens == solo.ids and r.finish_reason == solo.finish_reason


def test_tensorrt_profiles_cover_every_stage(staged_demo_build):
    # TensorRT builds one plan per stage (engines.trt.prepare over the stage graphs); the profile
    # logic is pure Python and runs here: hidden_in has a fixed width, the rest the usual roles.
    from dsv3_export.engines.trt import TrtOptions, make_profiles

    m = read_manifest(staged_demo_build)
    options = TrtOptions(max_batch=4, max_seq_len=256).resolve(m.config["max_seq_len"])
    for stage in m.stages:
        profiles = make_profiles(m.io[stage["file"]]["inputs"], options)
        assert [p["name"] for p in profiles] == [p["name"] for p in make_profiles(
            m.io["mtp.onnx"]["inputs"], options)]
        for p in profiles:
            if "hidden_in" in p["inputs"]:
                assert p["inputs"]["hidden_in"]["max"][2] == p["inputs"]["hidden_in"]["min"][2] == m.config["dim"]
            assert set(p["inputs"]) == {i["name"] for i in m.io[stage["file"]]["inputs"]}
