"""engines/ort.py: working providers, the offline-optimized graphs, and ORT vs the PyTorch reference."""

from __future__ import annotations

import json
import shutil

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


def test_prepare_saves_optimized_graphs(tiny_build):
    manifest = json.loads((tiny_build / "manifest.json").read_text())
    engine = manifest["engine"]
    assert engine["kind"] == "onnxruntime" and engine["graph_optimization_level"] == "extended"
    assert engine["providers"] == ["CPUExecutionProvider"]
    for graph, optimized in (("model.onnx", "model.ort.onnx"), ("mtp.onnx", "mtp.ort.onnx")):
        entry = engine["graphs"][graph]
        own_data = optimized + ".data"
        assert entry["optimized"] == optimized
        assert entry["files"] == [optimized] + ([own_data] if (tiny_build / own_data).is_file() else [])
        for f in entry["files"]:
            assert f in manifest["files"] and (tiny_build / f).is_file()
        # Files the dedup step deleted are not listed.
        assert {f for f in manifest["files"] if f.startswith(optimized)} == set(entry["files"])
        assert entry["shared"]["deduplicated_bytes"] > 0
    assert engine["deduplicated_bytes"] == sum(g["shared"]["deduplicated_bytes"] for g in engine["graphs"].values())
    # The weights are external (the exported graph's data file, or the optimized graph's own for
    # the ones the optimizer changed); the graph itself is small.
    assert (tiny_build / "model.ort.onnx").stat().st_size < (tiny_build / "model.onnx.data").stat().st_size


def test_session_prefers_optimized_file(tiny_build, tmp_path):
    import onnxruntime as ort

    from dsv3_export.engines import ort as eo

    s = eo.session(tiny_build, "model", threads=1)
    assert s.dsv3_model_path.name == "model.ort.onnx"
    assert s.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert s.get_session_options().intra_op_num_threads == 1
    assert eo.session(tiny_build, "mtp").dsv3_model_path.name == "mtp.ort.onnx"
    # Without it: the raw graph, optimized online.
    bare = tmp_path / "bare"
    shutil.copytree(tiny_build, bare, ignore=shutil.ignore_patterns("*.ort.onnx*"))
    s = eo.session(bare, "model")
    assert s.dsv3_model_path.name == "model.onnx"
    assert s.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with pytest.raises(ExportError, match="no such graph"):
        eo.session(tmp_path, "model")


def _feeds(ids, past):
    return buffered_feed(ids, layer_pasts(past))


@pytest.mark.parametrize("optimized", [True, False], ids=["optimized", "raw"])
def test_ort_matches_reference_prefill_and_decode(tiny_build, reference, tmp_path, optimized):
    """Prefill of 7 tokens (batch 2), then 8 decode steps fed with the reference's greedy tokens:
    logits, hidden states and the latent cache within 1e-4 x max|ref|."""
    from dsv3_export.engines import ort as eo

    build = tiny_build
    if not optimized:
        build = tmp_path / "raw"
        shutil.copytree(tiny_build, build, ignore=shutil.ignore_patterns("*.ort.onnx*"))
    sess = eo.session(build, "model")
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
    print(f"max rel logits error over prefill + 8 decode steps ({'optimized' if optimized else 'raw'}): {worst:.2e}")


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
