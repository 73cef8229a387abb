"""Quantization numerics (exporter/quant.py) and each precision's graph form for one linear layer:
the quantize pass's nodes run by ONNX Runtime equal the torch emulation (quantized weights,
activation quantization) exactly when ORT runs the graph as written, and closely with its kernels."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from dsv3_export.core.config import preset
from dsv3_export.core.fp8 import FP8_DTYPE
from dsv3_export.exporter.passes.quantize import quantize
from dsv3_export.exporter.precision_policy import Policy
from dsv3_export.exporter.quant_numerics import (
    SharedLoads,
    dequantize_int,
    expert_block,
    fp8_act_quant,
    graph_weight,
    int8_act_quant,
    matmulnbits_blob,
    quantize_int,
    unsigned,
)
from dsv3_export.exporter.weights import RandomWeights

FQN = "layers.0.attn.wo.weight"  # [dim, n_heads * v_head_dim]


def test_quantize_int_partial_blocks():
    w = torch.randn(3, 200)
    q, s = quantize_int(w, 4, 128)
    assert q.dtype == torch.int8 and q.shape == (3, 200) and s.shape == (3, 2)
    assert int(q.abs().max()) <= 7
    # the partial block (72 columns) has its own scale, from its own values
    assert torch.allclose(s[:, 1], w[:, 128:].abs().amax(-1) / 7)
    err = (dequantize_int(q, s, 128) - w).abs()
    assert (err <= s.repeat_interleave(128, -1)[:, :200] / 2 + 1e-6).all()  # round to nearest
    q8, s8 = quantize_int(w, 8, 0)  # per output channel
    assert s8.shape == (3, 1) and torch.allclose(dequantize_int(q8, s8, 0), w, atol=float(s8.max()) / 2 + 1e-6)


def test_unsigned_codes_and_nbits_blob():
    q = torch.tensor([[-7, 7, 0, 1, -1]], dtype=torch.int8)
    assert unsigned(q, 8).tolist() == [[121, 135, 128, 129, 127]]
    assert unsigned(q, 4).tolist() == [[1 | 15 << 4, 8 | 9 << 4, 7 | 8 << 4]]  # low nibble first, padded with 8
    blob = matmulnbits_blob(q, 4, 32)
    assert blob.shape == (1, 1, 16) and blob[0, 0, 3:].tolist() == [0x88] * 13  # padding dequantizes to 0


def test_fp8_act_quant_is_deepseeks():
    x = torch.randn(2, 3, 200) * 5
    y = fp8_act_quant(x)
    for lo, hi in ((0, 128), (128, 200)):  # per token, per 128-group; the partial group on its own
        s = x[..., lo:hi].abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448
        assert torch.equal(y[..., lo:hi], (x[..., lo:hi] / s).to(FP8_DTYPE).float() * s)
    assert torch.equal(fp8_act_quant(torch.zeros(1, 4)), torch.zeros(1, 4))  # eps: no 0/0
    z = int8_act_quant(x)
    s = x.abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(z, torch.round(x / s) * s)


def test_expert_block_and_shared_loads():
    assert expert_block(128, 1024, 512) == 128 and expert_block(128, 64, 32) == 32 and expert_block(128, 200, 130) == 0
    calls = []
    loads = SharedLoads()
    make = lambda: calls.append(1) or ("w", "s")  # noqa: E731
    assert loads.get("k", 2, make)[0] == "w" and loads.get("k", 2, make)[1] == "s" and len(calls) == 1
    assert loads.get("k", 2, make) and len(calls) == 2  # forgotten after its last part


# ---- one linear layer through the pass ----------------------------------------------------------------
def _linear_model(out_dim: int, in_dim: int, gemm: bool) -> ir.Model:
    name = "model." + FQN
    w = helper.make_tensor(name, TensorProto.FLOAT, [out_dim, in_dim], np.zeros(out_dim * in_dim, np.float32))
    if gemm:
        nodes = [helper.make_node("Gemm", ["x", name], ["y"], transB=1)]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", in_dim])
    else:
        nodes = [helper.make_node("Transpose", [name], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"])]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", in_dim])
    graph = helper.make_graph(nodes, "linear", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))


def _run(model: ir.Model, x: np.ndarray, optimize: bool) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    proto.ir_version = 10
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


CASES = [("fp8", "ort"), ("int8", "ort"), ("int8", "qdq"), ("int8-wo", "ort"), ("int8-wo", "qdq"),
         ("int4-wo", "ort"), ("int4-wo", "qdq")]


@pytest.mark.parametrize("v_head_dim", [64, 50])  # in = 256 (two blocks) or 200 (a partial block)
@pytest.mark.parametrize("precision,target", CASES)
def test_linear_forms_equal_the_emulation(precision, target, v_head_dim):
    cfg = preset("tiny").replace(dim=256, n_heads=4, v_head_dim=v_head_dim)
    source = RandomWeights(cfg, seed=1)
    out_dim, in_dim = cfg.dim, cfg.n_heads * v_head_dim
    policy = Policy.make(precision)
    w = graph_weight(source, FQN, policy)
    act = {"fp8": fp8_act_quant, "int8": int8_act_quant}.get(precision, lambda t: t)
    for gemm in (False, True):
        model = quantize(_linear_model(out_dim, in_dim, gemm), source, policy, target=target)
        ops = {n.op_type for n in model.graph}
        assert "model." + FQN not in model.graph.initializers  # the float weight is gone
        if target == "ort" and precision != "fp8":
            assert ops & {"MatMulIntegerToFloat", "MatMulNBits"}
        else:
            assert "DequantizeLinear" in ops and ("QuantizeLinear" in ops) == (precision in ("fp8", "int8"))
        x = np.random.default_rng(0).standard_normal((5, in_dim) if gemm else (2, 3, in_dim)).astype(np.float32) * 3
        want = F.linear(act(torch.from_numpy(x)), w).numpy()
        kernel_quantizes = target == "ort" and precision.endswith("-wo")  # MatMulNBits accuracy_level 4
        tol = 3e-2 if kernel_quantizes else 1e-5
        for optimize in (False, True):
            got = _run(model, x, optimize)
            err = np.abs(got - want).max() / np.abs(want).max()
            # ORT's optimizer may turn a qdq weight-only pattern into MatMulNBits (int8 activations)
            assert err < (3e-2 if optimize and precision.endswith("-wo") else tol), (gemm, optimize, err)
        assert policy.decisions[FQN] != "kept" and not policy.decisions[FQN].startswith("float")


def test_int8_ort_form_avoids_u8s8_saturation():
    """Large activations and weights: the uint8 x uint8 form stays exact where u8 x s8 on AVX2 would saturate."""
    cfg = preset("tiny").replace(dim=256, n_heads=4, v_head_dim=64)
    source = RandomWeights(cfg, seed=2)
    policy = Policy.make("int8")
    model = quantize(_linear_model(256, 256, False), source, policy, target="ort")
    wq = model.graph.initializers["model." + FQN + "_q"]
    assert wq.dtype == ir.DataType.UINT8
    x = np.random.default_rng(1).standard_normal((1, 4, 256)).astype(np.float32)
    want = F.linear(int8_act_quant(torch.from_numpy(x)), graph_weight(source, FQN, policy)).numpy()
    assert np.abs(_run(model, x, True) - want).max() / np.abs(want).max() < 1e-5


def test_fp8_weight_is_dequantizelinear_with_block_size():
    cfg = preset("tiny").replace(dim=256, n_heads=4, v_head_dim=50)
    model = quantize(_linear_model(256, 200, False), RandomWeights(cfg), Policy.make("fp8"))
    dq = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].is_initializer()]
    assert len(dq) == 1
    node = dq[0]
    assert node.inputs[0].dtype == ir.DataType.FLOAT8E4M3FN and list(node.inputs[0].shape) == [256, 200]
    assert list(node.inputs[1].shape) == [256, 2]  # row scales: the 128x128 block scale repeated along out
    assert node.attributes["block_size"].as_int() == 128 and node.attributes["axis"].as_int() == 1
    q = [n for n in model.graph if n.op_type == "QuantizeLinear"][0]
    assert q.attributes["output_dtype"].as_int() == onnx.TensorProto.FLOAT8E4M3FN
