"""MoEDispatchFP8 lowered for ONNX Runtime (chosen experts only) equals its function body and the
torch reference, with aligned and partial 128-blocks, at decode and prefill sizes; the lowered
graph reads its expert stacks only through the chosen experts' Gather."""

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnxscript.rewriter import pattern

from dsv3_export.benchmarks.memory_bound import _kinds
from dsv3_export.core.fp8 import quantize_blocks
from dsv3_export.exporter.passes.lower_ort_moe_fp8 import E4M3_VALUES, RULE
from dsv3_export.plugins import DOMAIN
from dsv3_export.plugins.moe_dispatch import onnx_function, reference, spec


def _model(d, k, q1, q2, s1, s2) -> ir.Model:
    def init(name, array, dtype=None):
        t = ir.Tensor(array, dtype=dtype, name=name)
        return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(t.dtype), const_value=t)

    x = ir.Value(name="x", shape=ir.Shape(["N", d]), type=ir.TensorType(ir.DataType.FLOAT))
    idx = ir.Value(name="idx", shape=ir.Shape(["N", k]), type=ir.TensorType(ir.DataType.INT64))
    w = ir.Value(name="w", shape=ir.Shape(["N", k]), type=ir.TensorType(ir.DataType.FLOAT))
    gu = init("gu", _fp8(q1), ir.DataType.FLOAT8E4M3FN)
    dn = init("dn", _fp8(q2), ir.DataType.FLOAT8E4M3FN)
    gs, ds = init("gs", s1.numpy()), init("ds", s2.numpy())
    node = ir.node(spec.FP8_OP_NAME, [x, idx, w, gu, dn, gs, ds], domain=DOMAIN)
    node.outputs[0].name = "y"
    graph = ir.Graph([x, idx, w], node.outputs, nodes=[node], initializers=[gu, dn, gs, ds],
                     opset_imports={"": 23, DOMAIN: 1, "com.microsoft": 1})
    model = ir.Model(graph, ir_version=10)
    fn = ir.serde.deserialize_function(onnx_function.fp8_function_proto())
    model.functions[fn.identifier()] = fn
    return model


def _fp8(q: torch.Tensor) -> np.ndarray:
    return q.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)


def _run(model: ir.Model, feeds) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


@pytest.mark.parametrize("e,d,inter,n,k", [(8, 256, 128, 1, 2), (8, 200, 130, 5, 3), (6, 64, 32, 40, 2)])
def test_lowered_equals_body_and_reference(e, d, inter, n, k):
    g = torch.Generator().manual_seed(e * 1000 + d + n)
    x = torch.randn(n, d, generator=g)
    q1, s1 = quantize_blocks(torch.randn(e, 2 * inter, d, generator=g) / 8)
    q2, s2 = quantize_blocks(torch.randn(e, d, inter, generator=g) / 8)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    weight = torch.rand(n, k, generator=g)
    feeds = {"x": x.numpy(), "idx": idx.numpy(), "w": weight.numpy()}
    body = _run(_model(d, k, q1, q2, s1, s2), feeds)
    lowered_model = _model(d, k, q1, q2, s1, s2)
    assert pattern.RewriteRuleSet([RULE]).apply_to_model(lowered_model) == 1
    ops = {node.op_type for node in lowered_model.graph}
    assert spec.FP8_OP_NAME not in ops and "Unique" in ops
    lowered = _run(lowered_model, feeds)
    want = reference.moe_dispatch(x, idx, weight, q1, q2, w_gate_up_scale=s1, w_down_scale=s2).numpy()
    scale = np.abs(want).max()
    assert np.abs(lowered - body).max() / scale < 1e-6  # the same products, summed in the same order
    assert np.abs(lowered - want).max() / scale < 1e-5
    # memory_bound counts the codes and scales as expert stacks (read for the chosen experts only)
    codes = [v for name, v in lowered_model.graph.initializers.items() if name.endswith(".e4m3_codes")]
    assert len(codes) == 2 and all(_kinds(v) == {"experts"} for v in codes)


def test_e4m3_table_decodes_every_code():
    """Against E4M3's definition: sign, 4 exponent bits (bias 7), 3 mantissa bits, subnormals at
    exponent 0, NaN at S.1111.111 and no infinities."""
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exp, man = (code >> 3) & 0xF, code & 0x7
        if exp == 0xF and man == 0x7:
            assert np.isnan(E4M3_VALUES[code]), code
            continue
        value = sign * (man / 8 * 2.0 ** -6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7))
        assert E4M3_VALUES[code] == value, (code, E4M3_VALUES[code], value)
    assert np.nanmax(E4M3_VALUES) == 448.0
