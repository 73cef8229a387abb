"""engines/trt.py: the pure logic always (options, profiles, profile choice, profile table, manifest
entry, errors); building and running engines only where TensorRT, Triton and a CUDA GPU exist."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dsv3_export.core.errors import ExportError
from dsv3_export.engines import trt as trt_engine
from dsv3_export.engines.trt import TrtOptions, make_profiles, select_profile

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None
GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
needs_trt = pytest.mark.skipif(not (HAS_TRT and HAS_TRITON and GPU),
                               reason="needs TensorRT >= 10.15, Triton and a CUDA GPU (without TRITON_INTERPRET)")
no_trt = pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the missing-TensorRT message cannot be tested")

# The tiny preset's model.onnx / mtp.onnx inputs as pipeline.build.graph_io reports them.
MODEL_INPUTS = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}] + [
    {"name": f"past_latent.{i}", "dtype": "float32", "shape": ["batch", "past", 40]} for i in range(3)]
MTP_INPUTS = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
              {"name": "hidden_states", "dtype": "float32", "shape": ["batch", "seq", 64]},
              {"name": "past_latent.mtp", "dtype": "float32", "shape": ["batch", "past", 40]}]


def shapes(batch, seq, past, layers=3, width=40):
    return {"input_ids": (batch, seq), **{f"past_latent.{i}": (batch, past, width) for i in range(layers)}}


# ---- options -------------------------------------------------------------------------------------------
def test_defaults_follow_the_model_and_cap_huge_contexts():
    tiny = TrtOptions().resolve(1024)
    assert (tiny.max_seq_len, tiny.max_prefill, tiny.opt_prefill, tiny.max_batch) == (1024, 1024, 128, 8)
    v3 = TrtOptions().resolve(163840)  # DeepSeek-V3's real context is capped
    assert (v3.max_seq_len, v3.max_prefill) == (trt_engine.DEFAULT_MAX_SEQ_LEN, trt_engine.DEFAULT_MAX_PREFILL)
    small = TrtOptions(max_seq_len=64).resolve(1024)
    assert (small.max_prefill, small.opt_prefill) == (64, 64)
    assert TrtOptions(max_seq_len=64).resolve(1024).resolved and not TrtOptions().resolved


@pytest.mark.parametrize("values, needle", [
    (dict(max_seq_len=2048), "--max-seq-len 2048 exceeds the model's context length (max_seq_len 1024)"),
    (dict(max_seq_len=1), "--max-seq-len must be an integer >= 2"),
    (dict(max_batch=0), "--max-batch must be a positive integer"),
    (dict(max_batch=2, opt_batch=4), "opt_batch (4) exceeds --max-batch (2)"),
    (dict(max_seq_len=64, max_prefill=65), "--max-prefill must be between 1 and --max-seq-len (64)"),
    (dict(max_prefill=16, opt_prefill=17), "opt_prefill must be between 1 and max_prefill (16)"),
    (dict(max_seq_len=4, decode_seq=4), "decode_seq (4) must be below --max-seq-len (4)"),
    (dict(attention_impl="both"), "attention_impl must be one of aot, jit"),
    (dict(workspace_gib=0), "workspace_gib must be > 0"),
])
def test_bad_options_say_which(values, needle):
    with pytest.raises(ExportError) as err:
        TrtOptions(**values).resolve(1024)
    assert needle in str(err.value)


def test_options_from_dict():
    assert TrtOptions.from_dict({"max_batch": 2, "max_seq_len": None}) == TrtOptions(max_batch=2)
    assert TrtOptions.from_dict(None) == TrtOptions()
    with pytest.raises(ExportError, match="unknown TensorRT option.*max_batches"):
        TrtOptions.from_dict({"max_batches": 2})
    assert TrtOptions.from_dict(TrtOptions(max_batch=3).to_dict()) == TrtOptions(max_batch=3)


# ---- profiles ------------------------------------------------------------------------------------------
def test_prefill_and_decode_profiles_of_the_main_graph():
    opts = TrtOptions(max_batch=4, max_seq_len=512, max_prefill=256, opt_prefill=32).resolve(1024)
    prefill, decode = make_profiles(MODEL_INPUTS, opts)
    assert [prefill["name"], decode["name"]] == list(trt_engine.PROFILE_NAMES)
    assert prefill["inputs"]["input_ids"] == {"min": [1, 1], "opt": [1, 32], "max": [4, 256]}
    assert prefill["inputs"]["past_latent.2"] == {"min": [1, 0, 40], "opt": [1, 0, 40], "max": [4, 0, 40]}
    assert decode["inputs"]["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [4, 4]}
    assert decode["inputs"]["past_latent.0"] == {"min": [1, 1, 40], "opt": [1, 255, 40], "max": [4, 511, 40]}
    assert set(prefill["inputs"]) == set(decode["inputs"]) == {i["name"] for i in MODEL_INPUTS}
    assert decode["ranges"] == {"batch": [1, 1, 4], "seq": [1, 1, 4], "past": [1, 255, 511]}


def test_mtp_profiles_keep_fixed_dims_and_naive_caches_work():
    opts = TrtOptions(max_seq_len=64).resolve(1024)
    prefill, decode = make_profiles(MTP_INPUTS, opts)
    assert prefill["inputs"]["hidden_states"] == {"min": [1, 1, 64], "opt": [1, 64, 64], "max": [8, 64, 64]}
    assert decode["inputs"]["past_latent.mtp"]["max"] == [8, 63, 40]
    naive = [{"name": "past_latent.0", "shape": ["batch", "past", 4, 48]}]
    assert make_profiles(naive, opts)[1]["inputs"]["past_latent.0"]["max"] == [8, 63, 4, 48]


def test_unknown_symbolic_dim_is_refused():
    with pytest.raises(ExportError, match="input x: dimension 1 is 'tokens'"):
        make_profiles([{"name": "x", "shape": ["batch", "tokens"]}], TrtOptions().resolve(1024))
    with pytest.raises(ValueError, match="resolve"):
        make_profiles(MODEL_INPUTS, TrtOptions())


def test_profile_choice_follows_the_phase():
    profiles = make_profiles(MODEL_INPUTS, TrtOptions(max_batch=4, max_seq_len=512, max_prefill=256).resolve(1024))
    assert select_profile(profiles, shapes(2, 12, 0)) == 0  # prompt over an empty cache
    assert select_profile(profiles, shapes(1, 1, 0)) == 0  # a one-token prompt is a prefill too
    assert select_profile(profiles, shapes(2, 1, 12)) == 1  # decode
    assert select_profile(profiles, shapes(4, 2, 511)) == 1  # speculative verification, last positions
    assert select_profile(profiles, shapes(1, 256, 0)) == 0


@pytest.mark.parametrize("shape, needle", [
    (shapes(5, 1, 12), "input_ids dim 0 is 5, outside 1..4"),
    (shapes(1, 1, 512), "past_latent.0 dim 1 is 512, outside 1..511"),
    (shapes(1, 300, 0), "input_ids dim 1 is 300, outside 1..256"),
    (shapes(1, 8, 10), "input_ids dim 1 is 8, outside 1..4"),  # a prompt continued after a cache: no profile
])
def test_no_profile_fits_explains_and_suggests(shape, needle):
    profiles = make_profiles(MODEL_INPUTS, TrtOptions(max_batch=4, max_seq_len=512, max_prefill=256).resolve(1024))
    with pytest.raises(ExportError) as err:
        select_profile(profiles, shape, "model")
    msg = str(err.value)
    assert msg.startswith("model: input shapes") and needle in msg
    assert "prefill: batch 1..4, seq 1..256, past 0" in msg and "decode: batch 1..4, seq 1..4, past 1..511" in msg
    assert "--max-batch / --max-seq-len / --max-prefill" in msg


def test_profile_choice_input_errors():
    profiles = make_profiles(MODEL_INPUTS, TrtOptions().resolve(1024))
    bad = shapes(1, 1, 3)
    del bad["past_latent.1"]
    with pytest.raises(ExportError, match="missing input.*past_latent.1"):
        select_profile(profiles, bad)
    with pytest.raises(ExportError, match="unexpected input.*position_ids"):
        select_profile(profiles, {**shapes(1, 1, 3), "position_ids": (1, 1)})
    with pytest.raises(ExportError, match="input_ids has rank 1, the engine wants 2"):
        select_profile(profiles, {**shapes(1, 1, 3), "input_ids": (1,)})
    with pytest.raises(ExportError, match="no optimization profiles"):
        select_profile([], shapes(1, 1, 3))


def test_engine_profiles_must_match_the_table():
    table = make_profiles(MODEL_INPUTS, TrtOptions().resolve(1024))
    engine_view = [{"name": f"profile {i}", "inputs": {n: dict(s) for n, s in p["inputs"].items()}}
                   for i, p in enumerate(table)]
    trt_engine.check_profiles_match(table, engine_view, "model.plan")
    engine_view[1]["inputs"]["past_latent.0"] = {**engine_view[1]["inputs"]["past_latent.0"], "max": [8, 99, 40]}
    with pytest.raises(ExportError, match="profile 1 \\(decode\\) input past_latent.0"):
        trt_engine.check_profiles_match(table, engine_view, "model.plan")
    with pytest.raises(ExportError, match="lists 2 profiles, the engine has 1"):
        trt_engine.check_profiles_match(table, engine_view[:1], "model.plan")


def test_polygraphy_profiles_carry_the_shapes():
    table = make_profiles(MODEL_INPUTS, TrtOptions(max_seq_len=64).resolve(1024))
    prefill, decode = trt_engine.polygraphy_profiles(table)
    assert tuple(prefill["input_ids"].max) == (8, 64) and tuple(decode["past_latent.1"].min) == (1, 1, 40)
    assert list(decode.keys()) == [i["name"] for i in MODEL_INPUTS]


# ---- build directory pieces ------------------------------------------------------------------------------
def test_plan_names_profile_table_and_manifest_entry(tmp_path):
    assert trt_engine.plan_name("model.onnx") == "model.plan" and trt_engine.plan_name("mtp") == "mtp.plan"
    opts = TrtOptions(max_seq_len=64).resolve(1024)
    table = {"model.plan": {"graph": "model.onnx", "profiles": make_profiles(MODEL_INPUTS, opts)}}
    assert trt_engine.load_profiles(tmp_path) is None
    (tmp_path / "profiles.json").write_text(json.dumps(trt_engine.profiles_document(opts, table)))
    doc = trt_engine.load_profiles(tmp_path)
    assert doc["options"]["max_seq_len"] == 64 and doc["engines"]["model.plan"]["profiles"][1]["name"] == "decode"
    entry = trt_engine.manifest_entry(opts, {"model.onnx": {"plan": "model.plan"}}, tensorrt_version="10.15.1",
                                      device="NVIDIA H200 (sm_90)", seconds=12.345)
    assert entry["kind"] == "tensorrt" and entry["strongly_typed"] and entry["attention_impl"] == "aot"
    assert entry["profiles"] == "profiles.json" and entry["timing_cache"] == "timing.cache"
    assert entry["options"]["max_batch"] == 8 and entry["seconds"] == 12.35
    json.dumps(entry)


def test_bad_profile_tables(tmp_path):
    (tmp_path / "profiles.json").write_text("{no")
    with pytest.raises(ExportError, match="unreadable"):
        trt_engine.load_profiles(tmp_path)
    (tmp_path / "profiles.json").write_text("{}")
    with pytest.raises(ExportError, match="not a dsv3-export profile table"):
        trt_engine.load_profiles(tmp_path)
    (tmp_path / "profiles.json").write_text('{"format": 99, "engines": {}}')
    with pytest.raises(ExportError, match="newer"):
        trt_engine.load_profiles(tmp_path)


def test_dsv3_nodes_are_counted(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from dsv3_export.plugins.latent_attention import onnx_function as la

    node = la.make_node("q", "latent", "cache_lengths", "o", scale=0.1, kv_lora_rank=32)
    graph = helper.make_graph([node, helper.make_node("Identity", ["o"], ["y"])], "g",
                              [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 1, 2, 40]),
                               helper.make_tensor_value_info("latent", TensorProto.FLOAT, [1, 3, 40]),
                               helper.make_tensor_value_info("cache_lengths", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 32])])
    model = helper.make_model(graph, functions=[la.function_proto()],
                              opset_imports=[helper.make_opsetid("", la.OPSET), helper.make_opsetid("dsv3", 1)])
    onnx.save(model, tmp_path / "m.onnx")
    assert trt_engine.count_dsv3_nodes(tmp_path / "m.onnx") == {"LatentAttention": 1}
    trt_engine.check_portable(tmp_path / "m.onnx")
    model.graph.node.append(helper.make_node("MoE", ["y"], ["z"], domain="com.microsoft"))
    onnx.save(model, tmp_path / "lowered.onnx")
    with pytest.raises(ExportError, match=r"lowered.onnx holds ONNX Runtime-only ops \(com.microsoft::MoE\)"):
        trt_engine.check_portable(tmp_path / "lowered.onnx")


def test_lowered_ort_build_is_refused_for_tensorrt(tiny_build):
    """The default ORT build is lowered to ONNX Runtime's own ops: no TensorRT engine from that graph."""
    manifest = json.loads((tiny_build / "manifest.json").read_text())
    if not manifest.get("lowered"):
        pytest.skip("the shared tiny build is not lowered")
    with pytest.raises(ExportError, match="ONNX Runtime-only ops .*--no-lower"):
        trt_engine.check_portable(tiny_build / "model.onnx")


# ---- without TensorRT: one line, no traceback ---------------------------------------------------------------
@no_trt
def test_everything_trt_says_tensorrt_is_missing(tmp_path, tiny_build):
    for call in (trt_engine.require_tensorrt, lambda: trt_engine.session(tiny_build),
                 lambda: trt_engine.prepare(tmp_path, {}, TrtOptions().resolve(1024)),
                 lambda: trt_engine.polygraphy_runner(tiny_build, "model.onnx", name="trt")):
        with pytest.raises(ExportError, match="needs TensorRT >= 10.15"):
            call()
    from dsv3_export import engines
    with pytest.raises(ExportError, match="TensorRT"):
        engines.load(tiny_build, backend="trt")


def test_trt_options_on_the_ort_backend_are_refused(tmp_path):
    from dsv3_export.cli.main import main

    r = CliRunner().invoke(main, ["build", "tiny", "-o", str(tmp_path / "o"), "--max-batch", "4", "--no-verify"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert r.output.strip().splitlines()[-1] == "error: --max-batch: TensorRT options, for --backend trt only"
    assert not (tmp_path / "o").exists()


def test_providers_are_for_ort_only(tiny_build):
    from dsv3_export.engines.runtime import Engine

    with pytest.raises(ExportError, match="providers apply to --backend ort only"):
        Engine(tiny_build, backend="trt", providers=["CPUExecutionProvider"], check_files=False)


# ---- with TensorRT and a GPU ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trt_build(tmp_path_factory):
    from dsv3_export.core.build_options import BuildOptions
    from dsv3_export.pipeline.build import build

    out = tmp_path_factory.mktemp("trt") / "tiny-trt"
    build("tiny", out, BuildOptions(backend="trt", verify=False, trt={"max_batch": 4, "max_seq_len": 128}))
    return out


@needs_trt
def test_trt_build_directory(trt_build):
    manifest = json.loads((trt_build / "manifest.json").read_text())
    engine = manifest["engine"]
    assert manifest["backend"] == "trt" and engine["kind"] == "tensorrt"
    for f in ("model.plan", "mtp.plan", "profiles.json", "timing.cache"):
        assert f in manifest["files"], f
    assert not list(trt_build.glob("*.lock")) and not list(trt_build.glob("*.ort.onnx"))
    model = engine["graphs"]["model.onnx"]
    assert model["plugin_layers"] == sum(model["dsv3_nodes"].values()) > 0
    doc = trt_engine.load_profiles(trt_build)
    assert doc["options"]["max_seq_len"] == 128
    assert doc["engines"]["model.plan"]["profiles"][1]["inputs"]["past_latent.0"]["max"][:2] == [4, 127]


@needs_trt
def test_trt_engine_matches_onnx_runtime(trt_build):
    from dsv3_export import engines
    ort_engine = engines.load(trt_build, backend="ort")  # the raw graph, optimized online
    trt = engines.load(trt_build)
    assert trt.backend == "trt" and "TensorRT" in repr(trt)
    ids = np.random.default_rng(0).integers(2, 512, size=(2, 9))
    want_logits, _, want_past = ort_engine.forward(ids)
    logits, _, past = trt.forward(ids)
    assert np.abs(logits - want_logits).max() <= 1e-4 * np.abs(want_logits).max()
    step = np.array([[5], [7]])
    want, _, _ = ort_engine.forward(step, want_past)
    got, _, _ = trt.forward(step, past)  # switches to the decode profile
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    again, _, _ = trt.forward(ids)  # and back
    assert np.abs(again - want_logits).max() <= 1e-4 * np.abs(want_logits).max()
    with pytest.raises(ExportError, match="fit no optimization profile"):
        trt.forward(np.zeros((5, 1), dtype=np.int64), [np.zeros((5, 3, 40), np.float32)] * 3)
    assert trt.generate(ids[0].tolist(), max_new_tokens=6).ids == ort_engine.generate(ids[0].tolist(),
                                                                                      max_new_tokens=6).ids


@needs_trt
def test_trt_mtp_session(trt_build):
    s = trt_engine.session(trt_build, "mtp")
    assert [p["name"] for p in s.profiles] == ["prefill", "decode"]
    assert {o.name for o in s.get_outputs()} == {"logits", "present_latent.mtp"}
    logits, present = s.run(["logits", "present_latent.mtp"], {
        "input_ids": np.ones((1, 3), np.int64), "hidden_states": np.zeros((1, 3, 64), np.float32),
        "past_latent.mtp": np.zeros((1, 0, 40), np.float32)})
    assert logits.shape == (1, 3, 512) and present.shape == (1, 3, 40)
    with pytest.raises(ExportError, match="no output"):
        s.run(["hidden_states"], {})


@needs_trt
def test_trt_verify_passes(trt_build, tmp_path):
    from dsv3_export.verification.verify import verify

    result = verify(trt_build, "tiny", backends=["trt"], decode_steps=3, greedy_tokens=6, report_dir=tmp_path)
    assert result["passed"], result["checks"]


@needs_trt
def test_verify_builds_an_engine_for_an_unlowered_ort_build(tmp_path):
    from dsv3_export.core.build_options import BuildOptions
    from dsv3_export.pipeline.build import build
    from dsv3_export.verification.verify import verify

    out = tmp_path / "b"
    build("tiny", out, BuildOptions(verify=False, lower=False))
    result = verify(out, "tiny", backends=["trt"], decode_steps=2, greedy_tokens=4, report_dir=tmp_path / "r")
    assert result["passed"], result["checks"]
    assert not list(out.glob("*.plan"))  # built in memory, the build directory is untouched


@needs_trt
def test_default_verify_of_an_ort_build_skips_tensorrt(tiny_build, tmp_path):
    from dsv3_export.verification.verify import verify

    result = verify(tiny_build, "tiny", backends=None, decode_steps=1, greedy_tokens=2, report_dir=tmp_path)
    assert [s["runner"] for s in result["skipped"]] == ["trt"] and "no TensorRT plan" in result["skipped"][0]["reason"]
