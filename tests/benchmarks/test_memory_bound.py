"""memory_bound: bytes a decode token reads through a built graph, counted against the reference model."""

import json
import math

import numpy as np
import onnx_ir as ir
import pytest

from dsv3_export.benchmarks.memory_bound import decode_bound, step_bytes
from dsv3_export.exporter import load_reference


def _reference_step_bytes(preset: str) -> dict[str, int]:
    """The same count from the PyTorch reference's parameters (fp32): one embedding row, the top-k
    share of each routed expert stack, everything else whole. MTP is not part of a decode step."""
    model = load_reference(preset, mla="absorbed", seed=0, mtp=False)
    cfg = model.cfg
    out = {"embedding": 0, "experts": 0, "other": 0}
    for name, p in model.named_parameters():
        nbytes = p.numel() * 4
        if name == "embed.weight":
            out["embedding"] += nbytes // p.shape[0]
        elif name.endswith(("ffn.w_gate_up", "ffn.w_down")):
            out["experts"] += nbytes * cfg.n_activated_experts // cfg.n_routed_experts
        else:
            out["other"] += nbytes
    return out


def test_step_bytes_of_a_build_match_the_reference_parameters(tiny_build):
    cfg = json.loads((tiny_build / "manifest.json").read_text())["config"]
    got = step_bytes(tiny_build / "model.onnx", cfg)
    want = _reference_step_bytes("tiny")
    assert got["embedding"] == want["embedding"] == cfg["dim"] * 4
    # The lowered graph holds the shared experts inside the expert stack, as always-chosen entries:
    # the stack's share moves them from "other" to "experts", the sum stays.
    moe_layers = cfg["n_layers"] - cfg["n_dense_layers"]
    shared = cfg["n_shared_experts"] * 3 * cfg["moe_inter_dim"] * cfg["dim"] * 4 * moe_layers
    assert got["experts"] == want["experts"] + shared
    # Everything else: the reference's weights; the graph adds only small constants (shapes, scalars).
    assert 0 <= got["other"] - (want["other"] - shared) <= 0.01 * want["other"]
    assert got["weights"] == got["embedding"] + got["experts"] + got["other"]


def test_step_bytes_of_per_expert_weights(tmp_path):
    """--moe per-expert: each routed expert is its own weights (<stack>.expert<j>), k of them read a
    token (counted per expert, rounded to the byte); the shared experts are read every step."""
    from dsv3_export.exporter import open_source
    from dsv3_export.pipeline.build import Reporter, export_graph

    src = open_source("tiny")
    path = export_graph("model", src, tmp_path, Reporter(), lower=True, moe_form="per-expert")
    cfg = src.config.to_dict()
    got = step_bytes(path, cfg)
    want = _reference_step_bytes("tiny")
    moe_layers = cfg["n_layers"] - cfg["n_dense_layers"]
    assert abs(got["experts"] - want["experts"]) <= 2 * cfg["n_routed_experts"] * moe_layers
    assert 0 <= got["other"] - want["other"] <= 0.01 * want["other"]
    assert got["weights"] == got["embedding"] + got["experts"] + got["other"]


def _value(name, array):
    return ir.Value(name=name, const_value=ir.tensor(array, name=name))


def test_step_bytes_reads_rows_shares_and_skips_shapes(tmp_path):
    cfg = {"n_routed_experts": 8, "n_shared_experts": 1, "n_activated_experts": 2}
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1, 1]))
    table = _value("table", np.zeros((100, 16), np.float32))  # Gather: one row a token
    experts = _value("experts", np.zeros((9, 4, 16), np.float32))  # routed + shared: (2 + 1) of 9
    quantized = _value("quantized", np.zeros((8, 16, 4), np.int8))  # through DequantizeLinear: 2 of 8
    scale = _value("scale", np.ones((), np.float32))
    unread = _value("unread", np.zeros((1000, 1000), np.float32))  # only its shape is taken
    weight = _value("weight", np.zeros((16, 16), np.float32))  # used inside an If branch: whole
    x = ir.node("Gather", [table, ids])
    dq = ir.node("DequantizeLinear", [quantized, scale])
    moe = ir.node("MoE", [x.outputs[0], x.outputs[0], experts, None, dq.outputs[0]], domain="com.microsoft")
    shape = ir.node("Shape", [unread])
    branch_mm = ir.node("MatMul", [moe.outputs[0], weight])
    then_branch = ir.Graph([], branch_mm.outputs, nodes=[branch_mm], name="then")
    bias = _value("bias", np.zeros((16,), np.float32))  # the branch's own initializer: whole
    add = ir.node("Add", [moe.outputs[0], bias])
    else_branch = ir.Graph([], add.outputs, nodes=[add], initializers=[bias], name="else")
    cond = ir.node("Cast", [ir.node("ReduceSum", [shape.outputs[0]]).outputs[0]], attributes={"to": ir.DataType.BOOL})
    if_node = ir.node("If", [cond.outputs[0]], attributes={"then_branch": then_branch, "else_branch": else_branch})
    graph = ir.Graph([ids], if_node.outputs, nodes=[x, dq, moe, shape, cond.inputs[0].producer(), cond, if_node],
                     initializers=[table, experts, quantized, scale, unread, weight],
                     opset_imports={"": 21, "com.microsoft": 1})
    path = tmp_path / "g.onnx"
    ir.save(ir.Model(graph, ir_version=10), path)
    got = step_bytes(path, cfg)
    assert got["embedding"] == 16 * 4
    assert got["experts"] == (9 * 4 * 16 * 4) * 3 // 9 + (8 * 16 * 4) * 2 // 8
    assert got["other"] == 16 * 16 * 4 + 16 * 4 + 4  # both branches' weights, and the scalar scale whole
    assert got["weights"] == sum(got[k] for k in ("embedding", "experts", "other"))


def test_decode_bound_is_bandwidth_over_bytes():
    out = decode_bound({"weights": 1000}, {"8": 24, "64": 1000}, 4000.0, {"8": 2.0})
    assert out["8"]["bytes"] == 1024 and out["8"]["tokens_per_s"] == pytest.approx(4000 / 1024)
    assert out["8"]["reached"] == pytest.approx(2.0 / (4000 / 1024))
    assert out["64"]["reached"] is None and math.isclose(out["64"]["tokens_per_s"], 2.0)
