"""lower_ort: ORT-native Attention / com.microsoft.MoE equal the function bodies they replace."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from exporter.passes.lower_ort import lower_ort
from exporter.passes.plugin_attrs import plugin_attrs
from plugins.latent_attention.reference import latent_attention
from plugins.moe_dispatch.reference import moe_dispatch


def _value(name, dtype, shape, data=None):
    v = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
    if data is not None:
        v.const_value = ir.tensor(data)
    return v


def _sessions(graph_fn):
    """(function-body session, lowered session) for the same one-node graph."""
    out = []
    for lower in (False, True):
        model = plugin_attrs(graph_fn())
        if lower:
            model = lower_ort(model)
        out.append(ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]))
    return out


@pytest.mark.parametrize("s_len, t_len", [(1, 1), (1, 13), (3, 9), (6, 6)])
def test_latent_attention_to_attention(s_len, t_len):
    h, r, dr = 4, 32, 8
    c = r + dr

    def graph():
        q = _value("q", ir.DataType.FLOAT, ["B", "S", h, c])
        lat = _value("latent", ir.DataType.FLOAT, ["B", "T", c])
        node = ir.Node("dsv3", "LatentAttention", [q, lat], attributes=[ir.AttrFloat32("scale", 0.3), ir.AttrInt64("kv_lora_rank", r)])
        out = node.outputs[0]
        out.name, out.type, out.shape = "o", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["B", "S", h, r])
        return ir.Model(ir.Graph([q, lat], [out], nodes=[node], opset_imports={"": 23, "dsv3": 1}, name="g"), ir_version=10)

    body, lowered = _sessions(graph)
    assert not any(n.domain == "dsv3" for n in lower_ort(plugin_attrs(graph())).graph)
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((2, s_len, h, c), dtype=np.float32),
             "latent": rng.standard_normal((2, t_len, c), dtype=np.float32)}
    a, b = body.run(None, feeds)[0], lowered.run(None, feeds)[0]
    ref = latent_attention(torch.from_numpy(feeds["q"]), torch.from_numpy(feeds["latent"]), 0.3, r).numpy()
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_tokens, k", [(1, 2), (5, 2), (14, 3)])
def test_moe_dispatch_to_moe(n_tokens, k):
    e, d, i = 8, 16, 12
    rng = np.random.default_rng(n_tokens)
    w_gate_up = rng.standard_normal((e, 2 * i, d), dtype=np.float32)
    w_down = rng.standard_normal((e, d, i), dtype=np.float32)

    def graph():
        x = _value("x", ir.DataType.FLOAT, ["N", d])
        idx = _value("idx", ir.DataType.INT64, ["N", k])
        w = _value("w", ir.DataType.FLOAT, ["N", k])
        a = _value("w_gate_up", ir.DataType.FLOAT, [e, 2 * i, d], w_gate_up)
        b = _value("w_down", ir.DataType.FLOAT, [e, d, i], w_down)
        node = ir.Node("dsv3", "MoEDispatch", [x, idx, w, a, b])
        out = node.outputs[0]
        out.name, out.type, out.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["N", d])
        # x's only other reader comes first: the case where ORT's MoE would write over x.
        neg = ir.node("Neg", [x])
        neg.outputs[0].name = "neg_x"
        graph = ir.Graph([x, idx, w], [out], nodes=[neg, node], initializers=[a, b], opset_imports={"": 23, "dsv3": 1}, name="g")
        return ir.Model(graph, ir_version=10)

    body, lowered = _sessions(graph)
    # only experts 0..3 are ever routed to: 4..7 get no tokens
    idx = np.stack([rng.permutation(4)[:k] for _ in range(n_tokens)]).astype(np.int64)
    feeds = {"x": rng.standard_normal((n_tokens, d), dtype=np.float32), "idx": idx,
             "w": (rng.random((n_tokens, k), dtype=np.float32) + 0.05) * 2.5}
    a, b = body.run(None, feeds)[0], lowered.run(None, feeds)[0]
    ref = moe_dispatch(*(torch.from_numpy(feeds[n]) for n in ("x", "idx", "w")), torch.from_numpy(w_gate_up),
                       torch.from_numpy(w_down)).numpy()
    scale = np.abs(ref).max()
    assert np.abs(a - ref).max() <= 1e-5 * scale and np.abs(b - ref).max() <= 1e-5 * scale


def test_whole_model_lowered_equals_function_bodies(tmp_path):
    """tiny, prefill and decode: lowered vs portable graph within 1e-4 relative (and the reference)."""
    from exporter import load_reference, open_source
    from exporter.pipeline import Reporter, export_graph

    src = open_source("tiny")
    (tmp_path / "plain").mkdir()
    (tmp_path / "low").mkdir()
    plain = export_graph("model", src, tmp_path / "plain", Reporter())
    low = export_graph("model", src, tmp_path / "low", Reporter(), lower=True)
    s_plain, s_low = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (plain, low))
    ids = np.random.default_rng(1).integers(0, 512, (2, 9))
    past = [np.zeros((2, 0, 40), np.float32)] * 3
    model = load_reference("tiny")
    ref_past = None
    for step in range(4):
        feeds = {"input_ids": ids, **{f"past_latent.{i}": p for i, p in enumerate(past)}}
        a, b = s_plain.run(None, feeds), s_low.run(None, feeds)
        with torch.no_grad():
            r = model(torch.from_numpy(ids), ref_past)
        scale = np.abs(a[0]).max()
        assert np.abs(a[0] - b[0]).max() <= 1e-4 * scale
        assert np.abs(r.logits.numpy() - b[0]).max() <= 1e-4 * scale
        past, ref_past = b[2:], r.past
        ids = b[0][:, -1:].argmax(-1)
