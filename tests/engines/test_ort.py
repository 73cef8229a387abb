"""engines/ort.py: working providers, the engine step, sessions optimized at load, and ORT vs the
PyTorch reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dsv3_export.core.errors import ExportError
from tests.helpers import buffered_feed, layer_pasts


@pytest.fixture(scope="module")
def reference():
    from dsv3_export.exporter import load_reference

    return load_reference("tiny")


def rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(ref - got).max() / np.abs(ref).max())


def test_available_providers_quiet_and_cached(capfd):
    from dsv3_export.engines import ort as eo

    eo.available_providers.cache_clear()
    eo._provider_loads.cache_clear()
    providers = eo.available_providers()
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)  # probing a provider that cannot load says nothing
    assert providers[-1] == "CPUExecutionProvider"
    assert eo.available_providers() is providers
    assert set(eo.default_providers()) <= set(providers)


def test_unusable_provider_is_refused(tiny_build):
    from dsv3_export.engines import ort as eo

    if "CUDAExecutionProvider" in eo.available_providers():
        pytest.skip("CUDA works here")
    with pytest.raises(ExportError, match="CUDAExecutionProvider does not work"):
        eo.session(tiny_build, providers=["CUDAExecutionProvider"])


def test_prepare_loads_each_graph_and_writes_nothing(tiny_build):
    """The engine step leaves the exported graphs as the build's only weights: no optimized copy."""
    manifest = json.loads((tiny_build / "manifest.json").read_text())
    engine = manifest["engine"]
    assert engine["kind"] == "onnxruntime" and engine["graph_optimization_level"] == "extended"
    assert engine["providers"] == ["CPUExecutionProvider"] and engine["optimized"] == "at load"
    assert set(engine["graphs"]) == {"model.onnx", "mtp.onnx"}
    assert all(g["seconds"] >= 0 for g in engine["graphs"].values())
    assert not list(tiny_build.glob("*.ort.onnx*"))
    assert sorted(f.name for f in tiny_build.glob("*.data")) == ["model.onnx.data", "mtp.onnx.data"]
    assert manifest["disk"]["ratio"] < 1.5  # the weights once, the graphs, the tokenizer, the report


def test_prepare_names_a_graph_onnx_runtime_cannot_load(tmp_path):
    from dsv3_export.engines import ort as eo

    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(ExportError, match="model.onnx: ONNX Runtime cannot load it"):
        eo.prepare({"model.onnx": bad})
    assert sorted(f.name for f in tmp_path.iterdir()) == ["model.onnx"]


def test_session_optimizes_the_exported_graph_as_it_loads(tiny_build, tmp_path):
    import onnxruntime as ort

    from dsv3_export.engines import ort as eo

    s = eo.session(tiny_build, "model", threads=1)
    assert s.dsv3_model_path.name == "model.onnx"
    assert s.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert s.get_session_options().intra_op_num_threads == 1
    assert eo.session(tiny_build, "mtp").dsv3_model_path.name == "mtp.onnx"
    with pytest.raises(ExportError, match="no such graph"):
        eo.session(tmp_path, "model")


def _feeds(ids, past):
    return buffered_feed(ids, layer_pasts(past))


def test_ort_matches_reference_prefill_and_decode(tiny_build, reference):
    """Prefill of 7 tokens (batch 2), then 8 decode steps fed with the reference's greedy tokens:
    logits, hidden states and the latent cache within 1e-4 x max|ref|."""
    from dsv3_export.engines import ort as eo

    sess = eo.session(tiny_build, "model")
    names = [o.name for o in sess.get_outputs()]
    cfg = reference.cfg
    rng = np.random.default_rng(0)
    ids = rng.integers(2, cfg.vocab_size, size=(2, 7))
    past = [np.zeros((2, 0, cfg.latent_dim), np.float32) for _ in range(cfg.n_layers)]
    ref_past = None
    worst = 0.0
    for step in range(9):
        out = dict(zip(names, sess.run(None, _feeds(ids, past))))
        with torch.no_grad():
            ref = reference(torch.from_numpy(ids), ref_past)
        for name, r in [("logits", ref.logits), ("hidden_states", ref.hidden_states)] + \
                [(f"present_latent.{i}", p) for i, p in enumerate(ref.past)]:
            err = rel_err(r.numpy(), out[name])
            assert err <= 1e-4, (step, name, err)
            if name == "logits":
                worst = max(worst, err)
        past = [out[f"present_latent.{i}"] for i in range(cfg.n_layers)]
        ref_past = ref.past
        ids = ref.logits[:, -1:].argmax(-1).numpy()
    assert past[0].shape == (2, 7 + 8, cfg.latent_dim)
    print(f"max rel logits error over prefill + 8 decode steps: {worst:.2e}")


def test_mtp_graph_matches_reference(tiny_build, reference):
    from dsv3_export.engines import ort as eo

    sess = eo.session(tiny_build, "mtp")
    cfg = reference.cfg
    rng = np.random.default_rng(1)
    ids = rng.integers(2, cfg.vocab_size, size=(1, 5))
    hidden = rng.standard_normal((1, 5, cfg.dim)).astype(np.float32)
    logits, present = sess.run(["logits", "present_latent.mtp"], buffered_feed(
        ids, {"past_latent.mtp": np.zeros((1, 0, cfg.latent_dim), np.float32)}, hidden_states=hidden))
    with torch.no_grad():
        ref_logits, ref_present = reference.mtp_forward(torch.from_numpy(ids), torch.from_numpy(hidden))
    assert rel_err(ref_logits.numpy(), logits) <= 1e-4
    assert rel_err(ref_present.numpy(), present) <= 1e-4
