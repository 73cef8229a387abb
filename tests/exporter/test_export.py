"""The exported graphs: contract, custom-op nodes, ORT == reference, determinism, Polygraphy."""

import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dsv3_export.exporter import load_reference, open_source
from dsv3_export.pipeline.build import Reporter, export_graph
from tests.helpers import buffered_feed, layer_pasts, rel_max_err

TOL = 1e-4  # ORT vs reference: max |Δlogits| <= 1e-4 x max |logit|


@pytest.fixture(scope="session")
def tiny_graphs(tmp_path_factory):
    out = tmp_path_factory.mktemp("graphs")
    src = open_source("tiny")
    return out, export_graph("model", src, out, Reporter()), export_graph("mtp", src, out, Reporter())


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run_chain(sess, model, ids, steps):
    """Prefill then greedy decode steps on both; yields (ort_logits, ref_logits, ort_present)."""
    cfg = model.cfg
    past_np = [np.zeros((ids.shape[0], 0, cfg.latent_dim), np.float32) for _ in range(cfg.n_layers)]
    past_ref = None
    cur = ids
    for _ in range(steps + 1):
        feeds = buffered_feed(cur.numpy(), layer_pasts(past_np))
        logits, hidden, *present = sess.run(None, feeds)
        with torch.no_grad():
            ref = model(cur, past_ref)
        yield logits, ref, present
        past_np, past_ref = present, ref.past
        cur = ref.logits[:, -1:].argmax(-1)


def test_graph_contract(tiny_graphs):
    _, model_path, _ = tiny_graphs
    cfg = open_source("tiny").config
    m = onnx.load(str(model_path), load_external_data=False)
    ops = Counter((n.domain, n.op_type) for n in m.graph.node)
    assert ops[("dsv3", "LatentAttention")] == cfg.n_layers
    assert ops[("dsv3", "MoEDispatch")] == cfg.n_layers - cfg.n_dense_layers
    assert [i.name for i in m.graph.input] == ["input_ids", "cache_lengths"] + [f"past_latent.{i}"
                                                                                 for i in range(cfg.n_layers)]
    assert ops[("", "TensorScatter")] == cfg.n_layers  # the cache written in place (graph contract v2)
    assert [o.name for o in m.graph.output] == ["logits", "hidden_states"] + [f"present_latent.{i}" for i in range(cfg.n_layers)]
    present = m.graph.output[2].type.tensor_type.shape.dim
    assert present[2].dim_value == cfg.kv_lora_rank + cfg.qk_rope_head_dim == 40
    assert {f.name for f in m.functions} == {"LatentAttention", "MoEDispatch"}
    for node in m.graph.node:
        if node.domain == "dsv3":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["plugin_namespace"] == b"dsv3" and attrs["plugin_version"] == b"1"
    assert not m.graph.initializer or all(i.data_location == onnx.TensorProto.EXTERNAL for i in m.graph.initializer
                                          if np.prod(i.dims) > 64)


def test_ort_matches_reference_prefill_and_decode(tiny_graphs):
    _, model_path, _ = tiny_graphs
    model = load_reference("tiny")
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(5))
    errors = [rel_max_err(torch.from_numpy(o), r.logits) for o, r, _ in _run_chain(_session(model_path), model, ids, 8)]
    assert len(errors) == 9 and max(errors) <= TOL, errors


def test_mtp_graph_matches_reference(tiny_graphs):
    _, _, mtp_path = tiny_graphs
    model = load_reference("tiny")
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        h = model(ids).hidden_states
        ref_logits, ref_cache = model.mtp_forward(ids[:, 1:], h[:, :-1])
    sess = _session(mtp_path)
    logits, cache = sess.run(None, buffered_feed(ids[:, 1:].numpy(), {"past_latent.mtp": np.zeros((1, 0, 40), np.float32)},
                                                 hidden_states=h[:, :-1].numpy()))
    assert rel_max_err(ref_logits, torch.from_numpy(logits)) <= TOL
    assert cache.shape == tuple(ref_cache.shape)


def test_export_is_deterministic(tiny_graphs, tmp_path):
    first, model_path, _ = tiny_graphs
    again = export_graph("model", open_source("tiny"), tmp_path, Reporter())
    assert again.read_bytes() == model_path.read_bytes()
    assert (tmp_path / "model.onnx.data").read_bytes() == (first / "model.onnx.data").read_bytes()


def test_plain_polygraphy_run(tiny_graphs):
    """Any ONNX tool runs the graph through the function bodies: `polygraphy run --onnxrt`."""
    _, model_path, _ = tiny_graphs
    shapes = ["input_ids:[1,5]", "cache_lengths:[1]"] + [f"past_latent.{i}:[1,8,40]" for i in range(3)]
    proc = subprocess.run([sys.executable, "-m", "polygraphy", "run", str(model_path), "--onnxrt",
                           "--input-shapes", *shapes, "--val-range", "input_ids:[0,511]", "cache_lengths:[3,3]"],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "No module named polygraphy.__main__" in proc.stderr:
        poly = shutil.which("polygraphy")
        proc = subprocess.run([poly, "run", str(model_path), "--onnxrt", "--input-shapes", *shapes,
                               "--val-range", "input_ids:[0,511]", "cache_lengths:[3,3]"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "PASSED" in proc.stdout + proc.stderr


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("case", ["yarn-qlora-groups", "no-qlora-one-group"])
def test_transformers_saved_checkpoints_through_ort(tmp_path, case):
    from tests.exporter.test_hf_parity import CASES, _save_hf_model

    ckpt = tmp_path / "hf"
    _save_hf_model(ckpt, **CASES[case])
    src = open_source(ckpt)
    path = export_graph("model", src, tmp_path, Reporter())
    model = load_reference(src)
    sess = _session(path)
    ids = torch.randint(0, 160, (2, 10), generator=torch.Generator().manual_seed(7))
    errors = [rel_max_err(r.logits, torch.from_numpy(o)) for o, r, _ in _run_chain(sess, model, ids, 8)]
    assert max(errors) <= TOL, errors
    # greedy 32 tokens driven by ORT's own cache == the reference's
    cfg = model.cfg
    past = [np.zeros((2, 0, cfg.latent_dim), np.float32) for _ in range(cfg.n_layers)]
    cur, tokens = ids.numpy(), []
    for _ in range(32):
        logits, _, *past = sess.run(None, buffered_feed(cur, layer_pasts(past)))
        cur = logits[:, -1:].argmax(-1)
        tokens.append(cur)
    with torch.no_grad():
        assert np.array_equal(np.concatenate(tokens, 1), model.generate_greedy(ids, 32).numpy())
