"""lower_ort: every rule's ORT-native form equals the function bodies / traced nodes it replaces."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from dsv3_export.exporter.passes.lower_ort import lower_ort
from dsv3_export.exporter.passes.plugin_attrs import plugin_attrs
from dsv3_export.plugins.latent_attention.reference import latent_attention
from dsv3_export.plugins.moe_dispatch.reference import moe_dispatch
from tests.helpers import buffered_feed, layer_pasts


def _value(name, dtype, shape, data=None):
    v = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
    if data is not None:
        v.const_value = ir.tensor(data)
    return v


def _sessions(graph_fn, moe_form="fused"):
    """(function-body session, lowered session) for the same one-node graph."""
    out = []
    for lower in (False, True):
        model = plugin_attrs(graph_fn())
        if lower:
            model = lower_ort(model, moe_form)
        out.append(ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]))
    return out


@pytest.mark.parametrize("s_len, t_len", [(1, 1), (1, 13), (3, 9), (6, 6)])
def test_latent_attention_alone_to_matmul(s_len, t_len):
    h, r, dr = 4, 32, 8
    c = r + dr

    def graph():
        q = _value("q", ir.DataType.FLOAT, ["B", "S", h, c])
        lat = _value("latent", ir.DataType.FLOAT, ["B", "T", c])
        lengths = _value("cache_lengths", ir.DataType.INT64, ["B"])
        node = ir.Node("dsv3", "LatentAttention", [q, lat, lengths],
                       attributes=[ir.AttrFloat32("scale", 0.3), ir.AttrInt64("kv_lora_rank", r)])
        out = node.outputs[0]
        out.name, out.type, out.shape = "o", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["B", "S", h, r])
        return ir.Model(ir.Graph([q, lat, lengths], [out], nodes=[node], opset_imports={"": 23, "dsv3": 1}, name="g"),
                        ir_version=10)

    body, lowered = _sessions(graph)
    assert not any(n.domain == "dsv3" for n in lower_ort(plugin_attrs(graph())).graph)
    rng = np.random.default_rng(0)
    # Row 0 fills its buffer (T - S cached rows); row 1 has fewer, the buffer's later rows hidden.
    feeds = {"q": rng.standard_normal((2, s_len, h, c), dtype=np.float32),
             "latent": rng.standard_normal((2, t_len, c), dtype=np.float32),
             "cache_lengths": np.array([t_len - s_len, max(t_len - s_len - 3, 0)], np.int64)}
    a, b = body.run(None, feeds)[0], lowered.run(None, feeds)[0]
    ref = latent_attention(torch.from_numpy(feeds["q"]), torch.from_numpy(feeds["latent"]), 0.3, r,
                           torch.from_numpy(feeds["cache_lengths"])).numpy()
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("s_len, t_len", [(1, 1), (1, 40), (2, 40), (63, 63), (64, 64), (70, 75)])
def test_mla_absorbed_decode_naive_prefill(s_len, t_len):
    """Einsum(W_UK) -> LatentAttention -> Einsum(W_UV) becomes an If: absorbed below 64 query
    tokens, naive (K/V expanded) from 64 on; both equal the function body and the naive math."""
    from dsv3_export.exporter.passes.lower_ort_mla import NAIVE_PREFILL_MIN_TOKENS

    h, r, dr, dn, dv = 4, 32, 8, 16, 12
    rng = np.random.default_rng(s_len)
    w_uk = rng.standard_normal((h, dn, r), dtype=np.float32) / 4
    w_uv = rng.standard_normal((h, dv, r), dtype=np.float32) / 4

    def graph():
        q_nope = _value("q_nope", ir.DataType.FLOAT, ["B", "S", h, dn])
        q_rope = _value("q_rope", ir.DataType.FLOAT, ["B", "S", h, dr])
        lat = _value("latent", ir.DataType.FLOAT, ["B", "T", r + dr])
        lengths = _value("cache_lengths", ir.DataType.INT64, ["B"])
        wk, wv = _value("w_uk", ir.DataType.FLOAT, [h, dn, r], w_uk), _value("w_uv", ir.DataType.FLOAT, [h, dv, r], w_uv)
        q_lat = ir.node("Einsum", [q_nope, wk], attributes={"equation": "bshd,hdc->bshc"})
        q = ir.node("Concat", [q_lat.outputs[0], q_rope], attributes={"axis": -1})
        att = ir.Node("dsv3", "LatentAttention", [q.outputs[0], lat, lengths],
                      attributes=[ir.AttrFloat32("scale", 0.3), ir.AttrInt64("kv_lora_rank", r)])
        out = ir.node("Einsum", [att.outputs[0], wv], attributes={"equation": "bshc,hdc->bshd"})
        y = out.outputs[0]
        y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["B", "S", h, dv])
        return ir.Model(ir.Graph([q_nope, q_rope, lat, lengths], [y], nodes=[q_lat, q, att, out], initializers=[wk, wv],
                                 opset_imports={"": 23, "dsv3": 1}, name="g"), ir_version=10)

    ops = [n.op_type for n in lower_ort(plugin_attrs(graph())).graph]
    assert "If" in ops and "Einsum" not in ops and "LatentAttention" not in ops
    body, lowered = _sessions(graph)
    feeds = {"q_nope": rng.standard_normal((2, s_len, h, dn), dtype=np.float32),
             "q_rope": rng.standard_normal((2, s_len, h, dr), dtype=np.float32),
             "latent": rng.standard_normal((2, t_len, r + dr), dtype=np.float32),
             "cache_lengths": np.array([t_len - s_len, max(t_len - s_len - 3, 0)], np.int64)}
    a, b = body.run(None, feeds)[0], lowered.run(None, feeds)[0]
    # naive MLA in float64: K/V per head from the latent, query s of row b at position L_b + s
    qn, qr, lat = (feeds[k].astype(np.float64) for k in ("q_nope", "q_rope", "latent"))
    k_nope = np.einsum("btc,hdc->bthd", lat[..., :r], w_uk)
    v = np.einsum("btc,hdc->bthd", lat[..., :r], w_uv)
    scores = (np.einsum("bshd,bthd->bsht", qn, k_nope) + np.einsum("bshd,btd->bsht", qr, lat[..., r:])) * 0.3
    visible = np.arange(t_len)[None, None, :] <= np.arange(s_len)[None, :, None] + feeds["cache_lengths"][:, None, None]
    scores = np.where(visible[:, :, None, :], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    ref = np.einsum("bsht,bthd->bshd", p / p.sum(-1, keepdims=True), v)
    scale = np.abs(ref).max()
    branch = "naive" if s_len >= NAIVE_PREFILL_MIN_TOKENS else "absorbed"
    assert np.abs(a - ref).max() <= 1e-5 * scale
    assert np.abs(b - ref).max() <= 1e-5 * scale, branch


def _moe_graph(w_gate_up: np.ndarray, w_down: np.ndarray, k: int) -> ir.Model:
    """y = MoEDispatch(x [N, d], idx [N, k], w [N, k]) over the two expert stacks."""
    e, two_i, d = w_gate_up.shape
    x = _value("x", ir.DataType.FLOAT, ["N", d])
    idx = _value("idx", ir.DataType.INT64, ["N", k])
    w = _value("w", ir.DataType.FLOAT, ["N", k])
    a = _value("w_gate_up", ir.DataType.FLOAT, [e, two_i, d], w_gate_up)
    b = _value("w_down", ir.DataType.FLOAT, [e, d, two_i // 2], w_down)
    node = ir.Node("dsv3", "MoEDispatch", [x, idx, w, a, b])
    out = node.outputs[0]
    out.name, out.type, out.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["N", d])
    # x's only other reader comes first: the case where ORT's MoE would write over x.
    neg = ir.node("Neg", [x])
    neg.outputs[0].name = "neg_x"
    graph = ir.Graph([x, idx, w], [out], nodes=[neg, node], initializers=[a, b], opset_imports={"": 23, "dsv3": 1}, name="g")
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("form", ["fused", "per-expert"])
@pytest.mark.parametrize("n_tokens, k, i", [(1, 2, 12), (5, 2, 12), (14, 3, 12), (5, 2, 7)])
def test_moe_dispatch_lowered(n_tokens, k, i, form):
    """fused: experts cut in MOE_PARTS = 2 pieces (i = 12), or kept whole when the width does not
    divide (7); per-expert: each expert its own MatMuls over its rows, experts no token chose get none."""
    e, d = 8, 16
    rng = np.random.default_rng(n_tokens)
    w_gate_up = rng.standard_normal((e, 2 * i, d), dtype=np.float32)
    w_down = rng.standard_normal((e, d, i), dtype=np.float32)

    def graph():
        return _moe_graph(w_gate_up, w_down, k)

    lowered_graph = lower_ort(plugin_attrs(graph()), form).graph
    assert not any(n.op_type == "MoEDispatch" for n in lowered_graph)
    if form == "fused":
        moe = next(n for n in lowered_graph if n.op_type == "MoE")
        parts = 2 if i % 2 == 0 else 1
        assert moe.attributes["k"].as_int() == parts * k and list(moe.inputs[4].shape) == [parts * e, d, i // parts]
    else:
        assert sum(n.op_type == "MatMul" for n in lowered_graph) == 2 * e
        assert sorted(lowered_graph.initializers) == sorted(f"{w}.expert{j}" for w in ("w_gate_up", "w_down")
                                                            for j in range(e))
        assert list(lowered_graph.initializers["w_gate_up.expert3"].shape) == [d, 2 * i]  # [in, out]: ORT prepacks it
    body, lowered = _sessions(graph, form)
    # only experts 0..3 are ever routed to: 4..7 get no tokens
    idx = np.stack([rng.permutation(4)[:k] for _ in range(n_tokens)]).astype(np.int64)
    feeds = {"x": rng.standard_normal((n_tokens, d), dtype=np.float32), "idx": idx,
             "w": (rng.random((n_tokens, k), dtype=np.float32) + 0.05) * 2.5}
    a, b = body.run(None, feeds)[0], lowered.run(None, feeds)[0]
    ref = moe_dispatch(*(torch.from_numpy(feeds[n]) for n in ("x", "idx", "w")), torch.from_numpy(w_gate_up),
                       torch.from_numpy(w_down)).numpy()
    scale = np.abs(ref).max()
    assert np.abs(a - ref).max() <= 1e-5 * scale and np.abs(b - ref).max() <= 1e-5 * scale


def test_per_expert_sums_every_call_at_prefill_sizes():
    """512 tokens x 3 experts, run eight times: each run within 1e-5 of the reference (ONNX Runtime's
    ScatterND(add) gives wrong sums now and then at this size with 2 threads; the form must not use it)."""
    e, d, i, k, n = 8, 256, 64, 3, 512
    rng = np.random.default_rng(7)
    w_gate_up = rng.standard_normal((e, 2 * i, d), dtype=np.float32) / 16
    w_down = rng.standard_normal((e, d, i), dtype=np.float32) / 16
    _, lowered = _sessions(lambda: _moe_graph(w_gate_up, w_down, k), "per-expert")
    feeds = {"x": rng.standard_normal((n, d), dtype=np.float32),
             "idx": np.stack([rng.permutation(e)[:k] for _ in range(n)]).astype(np.int64),
             "w": rng.random((n, k), dtype=np.float32) + 0.05}
    ref = moe_dispatch(*(torch.from_numpy(feeds[name]) for name in ("x", "idx", "w")), torch.from_numpy(w_gate_up),
                       torch.from_numpy(w_down)).numpy()
    for _ in range(8):  # ScatterND(add) alone: a wrong sum in 14 runs of 40 at this size
        assert np.abs(lowered.run(None, feeds)[0] - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("form", ["fused", "per-expert"])
@pytest.mark.parametrize("n_shared", [1, 2])
def test_moe_with_shared_experts_lowered(n_shared, form):
    """The shared expert MLP (n times an expert's width) becomes n experts every token is routed to:
    inside the MoE node (fused) or as n more experts of their own (per-expert)."""
    e, d, i, k, n_tokens = 6, 16, 8, 2, 7
    rng = np.random.default_rng(n_shared)
    w_gate_up = rng.standard_normal((e, 2 * i, d), dtype=np.float32) / 4
    w_down = rng.standard_normal((e, d, i), dtype=np.float32) / 4
    w1, w3 = (rng.standard_normal((n_shared * i, d), dtype=np.float32) / 4 for _ in range(2))
    w2 = rng.standard_normal((d, n_shared * i), dtype=np.float32) / 4

    def graph():
        x = _value("x", ir.DataType.FLOAT, ["N", d])
        idx, w = _value("idx", ir.DataType.INT64, ["N", k]), _value("w", ir.DataType.FLOAT, ["N", k])
        weights = [_value(name, ir.DataType.FLOAT, list(a.shape), a) for name, a in
                   (("w_gate_up", w_gate_up), ("w_down", w_down), ("w1", w1), ("w3", w3), ("w2", w2))]
        a, b, v1, v3, v2 = weights
        routed = ir.Node("dsv3", "MoEDispatch", [x, idx, w, a, b])
        gate, up = (ir.node("Gemm", [x, v], attributes={"transB": 1}) for v in (v1, v3))
        sig = ir.node("Sigmoid", [gate.outputs[0]])
        silu = ir.node("Mul", [gate.outputs[0], sig.outputs[0]])
        h = ir.node("Mul", [silu.outputs[0], up.outputs[0]])
        down = ir.node("Gemm", [h.outputs[0], v2], attributes={"transB": 1})
        out = ir.node("Add", [routed.outputs[0], down.outputs[0]])
        y = out.outputs[0]
        y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["N", d])
        return ir.Model(ir.Graph([x, idx, w], [y], nodes=[routed, gate, up, sig, silu, h, down, out],
                                 initializers=weights, opset_imports={"": 23, "dsv3": 1}, name="g"), ir_version=10)

    lowered_graph = lower_ort(plugin_attrs(graph()), form).graph
    assert not any(n.op_type == "Gemm" for n in lowered_graph)
    if form == "fused":  # no stale copy; each expert in MOE_PARTS pieces, every chosen expert's pieces chosen
        assert sorted(lowered_graph.initializers) == ["w_down.with_shared.parts2", "w_gate_up.with_shared.parts2"]
        moe = next(n for n in lowered_graph if n.op_type == "MoE")
        assert moe.attributes["k"].as_int() == 2 * (k + n_shared)
        assert list(moe.inputs[2].shape) == [2 * (e + n_shared), i, d]
    else:  # no stale copy: every weight now belongs to one expert
        assert sorted(lowered_graph.initializers) == sorted(
            [f"{w}.expert{j}" for w in ("w_gate_up", "w_down") for j in range(e)]
            + [f"{w}.shared{s}" for w in ("w1", "w2") for s in range(n_shared)])
        assert sum(n.op_type == "MatMul" for n in lowered_graph) == 2 * (e + n_shared)
    body, lowered = _sessions(graph, form)
    idx = np.stack([rng.permutation(e)[:k] for _ in range(n_tokens)]).astype(np.int64)
    feeds = {"x": rng.standard_normal((n_tokens, d), dtype=np.float32), "idx": idx,
             "w": (rng.random((n_tokens, k), dtype=np.float32) + 0.05) * 2.5}
    x = torch.from_numpy(feeds["x"])
    silu = torch.nn.functional.silu(x @ torch.from_numpy(w1).T)
    shared = (silu * (x @ torch.from_numpy(w3).T)) @ torch.from_numpy(w2).T
    ref = (moe_dispatch(x, torch.from_numpy(idx), torch.from_numpy(feeds["w"]), torch.from_numpy(w_gate_up),
                        torch.from_numpy(w_down)) + shared).numpy()
    a, b = body.run(None, feeds)[0], lowered.run(None, feeds)[0]
    scale = np.abs(ref).max()
    assert np.abs(a - ref).max() <= 1e-5 * scale and np.abs(b - ref).max() <= 1e-5 * scale


@pytest.mark.parametrize("form", ["fused", "per-expert"])
def test_whole_model_lowered_equals_function_bodies(tmp_path, form):
    """tiny: a naive-branch prefill (70 tokens), then absorbed steps of 1 and 2 tokens; lowered vs
    portable graph within 1e-4 relative, and the reference; every rule fired in every layer."""
    import collections

    import onnx

    from dsv3_export.exporter import load_reference, open_source
    from dsv3_export.pipeline.build import Reporter, export_graph

    src = open_source("tiny")
    cfg = src.config
    (tmp_path / "plain").mkdir()
    (tmp_path / "low").mkdir()
    plain = export_graph("model", src, tmp_path / "plain", Reporter())
    low = export_graph("model", src, tmp_path / "low", Reporter(), lower=True, moe_form=form)
    nodes = onnx.load(str(low), load_external_data=False).graph.node
    ops = collections.Counter(n.op_type for n in nodes)
    n_moe = cfg.n_layers - cfg.n_dense_layers
    assert ops["If"] == cfg.n_layers and ops["RotaryEmbedding"] == 2 * cfg.n_layers
    if form == "fused":
        assert ops["MoE"] == n_moe
    else:  # the shared MLP is n_shared experts wide
        assert "MoE" not in ops and ops["MatMul"] >= 2 * (cfg.n_routed_experts + cfg.n_shared_experts) * n_moe
    assert ops["RMSNormalization"] == 3 * cfg.n_layers + 1 + (cfg.q_lora_rank > 0) * cfg.n_layers
    assert not {"Einsum", "LatentAttention", "MoEDispatch", "Pow"} & set(ops), ops
    assert not any(n.op_type == "Gemm" and any("shared_experts" in i for i in n.input) for n in nodes)  # in the experts
    s_plain, s_low = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (plain, low))
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.vocab_size, (2, 70))
    past = [np.zeros((2, 0, cfg.kv_lora_rank + cfg.qk_rope_head_dim), np.float32)] * cfg.n_layers
    model = load_reference("tiny")
    ref_past = None
    for width in (70, 1, 2, 1):
        ids = ids[:, -width:] if width <= ids.shape[1] else np.concatenate([ids, ids], 1)[:, :width]
        feeds = buffered_feed(ids, layer_pasts(past))
        a, b = s_plain.run(None, feeds), s_low.run(None, feeds)
        with torch.no_grad():
            r = model(torch.from_numpy(ids), ref_past)
        scale = np.abs(a[0]).max()
        assert np.abs(a[0] - b[0]).max() <= 1e-4 * scale
        assert np.abs(r.logits.numpy() - b[0]).max() <= 1e-4 * scale
        for x, y in zip(a[2:], b[2:]):
            assert np.abs(x - y).max() <= 1e-4 * np.abs(x).max()
        past, ref_past = b[2:], r.past
        ids = np.concatenate([ids, b[0][:, -1:].argmax(-1)], 1)
