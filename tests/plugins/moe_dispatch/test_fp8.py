"""MoEDispatchFP8: the FP8 contract (spec), its torch reference and its ONNX function body agree,
with aligned and partial 128-blocks; bad scales are refused with the reason."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dsv3_export.core.fp8 import dequantize_blocks, quantize_blocks
from dsv3_export.plugins import DOMAIN
from dsv3_export.plugins.moe_dispatch import onnx_function, reference, spec


def _case(e, d, inter, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    q1, s1 = quantize_blocks(torch.randn(e, 2 * inter, d, generator=g) / 8)
    q2, s2 = quantize_blocks(torch.randn(e, d, inter, generator=g) / 8)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    weight = torch.rand(n, k, generator=g)
    return x, idx, weight, q1, q2, s1, s2


def _body(x, idx, weight, q1, q2, s1, s2) -> np.ndarray:
    def fp8(name, q):
        return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(q.shape), q.view(torch.uint8).numpy().tobytes(),
                                  raw=True)

    node = helper.make_node(spec.FP8_OP_NAME, ["x", "idx", "w", "gu", "dn", "gs", "ds"], ["y"], domain=DOMAIN)
    graph = helper.make_graph([node], "moe", [helper.make_tensor_value_info(n, t, None) for n, t in
                                              (("x", TensorProto.FLOAT), ("idx", TensorProto.INT64), ("w", TensorProto.FLOAT))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [fp8("gu", q1), fp8("dn", q2), numpy_helper.from_array(s1.numpy(), "gs"),
                               numpy_helper.from_array(s2.numpy(), "ds")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(DOMAIN, 1)],
                              functions=[onnx_function.fp8_function_proto()])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.numpy(), "idx": idx.numpy(), "w": weight.numpy()})[0]


@pytest.mark.parametrize("e,d,inter", [(4, 256, 128), (4, 200, 130), (3, 64, 32)])
def test_body_equals_reference_equals_dequantized_float_op(e, d, inter):
    x, idx, weight, q1, q2, s1, s2 = _case(e, d, inter, n=6, k=2)
    want = reference.moe_dispatch(x, idx, weight, q1, q2, w_gate_up_scale=s1, w_down_scale=s2)
    dense = reference.moe_dispatch(x, idx, weight, dequantize_blocks(q1, s1), dequantize_blocks(q2, s2))
    assert torch.equal(want, dense)
    got = _body(x, idx, weight, q1, q2, s1, s2)
    assert np.abs(got - want.numpy()).max() / want.abs().max().item() < 1e-5


def test_scale_contract_errors():
    x, idx, weight, q1, q2, s1, s2 = _case(4, 200, 130, n=3, k=2)
    assert spec.fp8_scale_shape(tuple(q1.shape)) == (4, 3, 2) and tuple(s1.shape) == (4, 3, 2)
    with pytest.raises(ValueError, match=r"w_gate_up_scale must have shape \(4, 3, 2\)"):
        reference.moe_dispatch(x, idx, weight, q1, q2, w_gate_up_scale=s1[:, :2], w_down_scale=s2)
    with pytest.raises(ValueError, match="w_down must be float8_e4m3fn"):
        reference.moe_dispatch(x, idx, weight, q1, q2.float(), w_gate_up_scale=s1, w_down_scale=s2)
    with pytest.raises(ValueError, match="w_down_scale must be float32"):
        reference.moe_dispatch(x, idx, weight, q1, q2, w_gate_up_scale=s1, w_down_scale=s2.double())


def test_op_names_and_schema():
    from dsv3_export.plugins.moe_dispatch import tensorrt

    assert spec.FP8_OP_NAME == "MoEDispatchFP8" == tensorrt.FP8_OP_NAME
    assert spec.FP8_INPUTS == spec.INPUTS + ("w_gate_up_scale", "w_down_scale")
    onnx_function.register_fp8_schema()
    schema = onnx.defs.get_schema(spec.FP8_OP_NAME, 1, DOMAIN)
    assert [i.name for i in schema.inputs] == list(spec.FP8_INPUTS)
    fn = onnx_function.fp8_function_proto()
    assert fn.name == spec.FP8_OP_NAME and list(fn.input) == list(spec.FP8_INPUTS)
    assert "DequantizeLinear" in {n.op_type for n in fn.node}
