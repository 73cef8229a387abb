"""MoEDispatch: reference vs naive per-token math, ONNX function body in ORT vs reference, contract."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from dsv3_export.plugins import PLUGIN_NAMESPACE, PLUGIN_VERSION
from dsv3_export.plugins.moe_dispatch import onnx_function, spec
from dsv3_export.plugins.moe_dispatch.reference import moe_dispatch

FP32_TOL = dict(rtol=1e-5, atol=1e-5)


def make_inputs(n, d, inter, e, k, dtype=torch.float32, seed=0, experts=None):
    """Distinct experts per token (as top-k gives), drawn from `experts` (default: all E)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(e) if experts is None else torch.tensor(experts)
    idx = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(n)]) if n else torch.zeros(0, k, dtype=torch.int64)
    x = torch.randn(n, d, generator=g)
    weight = torch.rand(n, k, generator=g)
    w_gate_up = torch.randn(e, 2 * inter, d, generator=g) / d**0.5
    w_down = torch.randn(e, d, inter, generator=g) / inter**0.5
    return x.to(dtype), idx, weight.to(dtype), w_gate_up.to(dtype), w_down.to(dtype)


def build_model(f=TensorProto.FLOAT) -> onnx.ModelProto:
    node = onnx_function.make_node("x", "topk_idx", "topk_weight", "w_gate_up", "w_down", "y")
    graph = helper.make_graph(
        [node], "moe_dispatch",
        [helper.make_tensor_value_info("x", f, ["N", "D"]),
         helper.make_tensor_value_info("topk_idx", TensorProto.INT64, ["N", "k"]),
         helper.make_tensor_value_info("topk_weight", f, ["N", "k"]),
         helper.make_tensor_value_info("w_gate_up", f, ["E", "2I", "D"]),
         helper.make_tensor_value_info("w_down", f, ["E", "D", "I"])],
        [helper.make_tensor_value_info("y", f, ["N", "D"])],
    )
    # ir_version 11: ORT 1.31 reads up to 13, onnx 1.23 would write 14.
    return helper.make_model(
        graph, ir_version=11, functions=[onnx_function.function_proto()],
        opset_imports=[helper.make_opsetid("", onnx_function.OPSET), helper.make_opsetid(spec.OP_DOMAIN, 1)],
    )


_SESSIONS = {}  # all dims are dynamic: one session per dtype serves every shape


def run_ort(*tensors):
    elem = TensorProto.FLOAT16 if tensors[0].dtype == torch.float16 else TensorProto.FLOAT
    if elem not in _SESSIONS:
        _SESSIONS[elem] = ort.InferenceSession(build_model(elem).SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = _SESSIONS[elem].run(None, {name: t.numpy() for name, t in zip(spec.INPUTS, tensors)})
    return torch.from_numpy(out)


def naive_per_token(x, idx, weight, w_gate_up, w_down):
    """Token by token, slot by slot, in float64."""
    x, weight, w_gate_up, w_down = (t.double() for t in (x, weight, w_gate_up, w_down))
    inter = w_down.shape[-1]
    y = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[n, j])
            gate = w_gate_up[e, :inter] @ x[n]
            up = w_gate_up[e, inter:] @ x[n]
            y[n] += weight[n, j] * (w_down[e] @ (F.silu(gate) * up))
    return y


# (n, d, inter, e, k)
CASES = [(1, 8, 4, 4, 2), (7, 6, 5, 3, 1), (5, 4, 3, 6, 3), (9, 16, 8, 8, 8)]


@pytest.mark.parametrize("shape", CASES)
def test_reference_matches_naive(shape):
    inputs = make_inputs(*shape)
    torch.testing.assert_close(moe_dispatch(*inputs), naive_per_token(*inputs).float(), **FP32_TOL)


@pytest.mark.parametrize("shape", CASES)
def test_onnx_function_matches_reference(shape):
    inputs = make_inputs(*shape)
    torch.testing.assert_close(run_ort(*inputs), moe_dispatch(*inputs), **FP32_TOL)


def test_experts_without_tokens():
    # Only experts 1 and 4 of 6 receive tokens; the others must contribute nothing.
    inputs = make_inputs(5, 8, 4, 6, 2, experts=[1, 4])
    expected = naive_per_token(*inputs).float()
    torch.testing.assert_close(moe_dispatch(*inputs), expected, **FP32_TOL)
    torch.testing.assert_close(run_ort(*inputs), expected, **FP32_TOL)


def test_no_tokens():
    inputs = make_inputs(0, 8, 4, 3, 2)
    assert moe_dispatch(*inputs).shape == (0, 8)
    assert run_ort(*inputs).shape == (0, 8)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 6), d=st.integers(1, 8), inter=st.integers(1, 6), e=st.integers(1, 6),
    k=st.integers(1, 3), seed=st.integers(0, 2**16),
)
def test_onnx_function_matches_reference_random(n, d, inter, e, k, seed):
    inputs = make_inputs(n, d, inter, e, min(k, e), seed=seed)
    torch.testing.assert_close(run_ort(*inputs), moe_dispatch(*inputs), **FP32_TOL)


def test_onnx_function_fp16():
    # fp16 end to end (ORT's CPU ScatterElements lacks fp16 "add": the body scatters in fp32).
    inputs = [t.half() if t.is_floating_point() else t for t in make_inputs(5, 8, 4, 4, 2)]
    out = run_ort(*inputs)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, moe_dispatch(*inputs), rtol=2e-3, atol=2e-3)


def test_bf16_reference_close_to_fp32():
    inputs = make_inputs(6, 32, 16, 4, 2)
    out = moe_dispatch(*(t.bfloat16() if t.is_floating_point() else t for t in inputs))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), moe_dispatch(*inputs), rtol=3e-2, atol=3e-2)


def test_function_proto_signature_and_memory_form():
    fp = onnx_function.function_proto()
    assert (fp.domain, fp.name) == (spec.OP_DOMAIN, spec.OP_NAME)
    assert list(fp.input) == list(spec.INPUTS) and len(fp.output) == len(spec.OUTPUTS)
    assert {a.name: a.s.decode() for a in fp.attribute_proto} == {
        "plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}
    assert set(fp.attribute) | {a.name for a in fp.attribute_proto} == set(spec.ATTRIBUTES)
    # Dense over experts: no per-token gather of weight matrices (memory N*k*2I*D).
    assert not {n.op_type for n in fp.node} & {"Gather", "GatherElements", "GatherND"}
    onnx.checker.check_model(build_model(), full_check=True)


def test_output_shape():
    assert spec.output_shape((7, 64), (7, 2), (7, 2), (8, 32, 64), (8, 64, 16)) == (7, 64)
    assert spec.output_shape(("N", 64), ("N", 8), ("N", 8), (256, 4096, 7168), (256, 7168, 2048)) == ("N", 64)


def _shapes(**over):
    base = dict(x=(4, 8), topk_idx=(4, 2), topk_weight=(4, 2), w_gate_up=(3, 10, 8), w_down=(3, 8, 5))
    return {**base, **over}


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(x=(4, 8, 1)), "x must have rank 2"),
        (dict(w_down=(3, 8)), "w_down must have rank 3"),
        (dict(topk_weight=(4, 3)), r"topk_idx \(4, 2\) and topk_weight \(4, 3\) must have the same shape"),
        (dict(topk_idx=(5, 2), topk_weight=(5, 2)), "token count N"),
        (dict(w_gate_up=(3, 9, 8)), "odd 9"),
        (dict(w_gate_up=(3, 12, 8)), r"\(12\) must be 2 \* w_down's last dim I \(5\)"),
        (dict(w_gate_up=(3, 10, 7)), "w_gate_up's last dim must equal x's hidden size D"),
        (dict(w_down=(3, 9, 5)), "w_down's second dim must equal x's hidden size D"),
        (dict(w_down=(2, 8, 5)), "same number of experts"),
        (dict(topk_idx=(4, 4), topk_weight=(4, 4)), r"top-k \(4\) cannot exceed"),
    ],
)
def test_validation_shape_errors(over, match):
    shapes = _shapes(**over)
    tensors = [torch.zeros(s, dtype=torch.int64 if name == "topk_idx" else torch.float32) for name, s in shapes.items()]
    with pytest.raises(ValueError, match=match):
        moe_dispatch(*tensors)


def test_validation_dtype_and_value_errors():
    x, idx, w, gu, dn = make_inputs(4, 8, 5, 3, 2)
    with pytest.raises(ValueError, match="topk_idx must be int64"):
        moe_dispatch(x, idx.int(), w, gu, dn)
    with pytest.raises(ValueError, match=r"w_down \(float16\) must have x's dtype \(float32\)"):
        moe_dispatch(x, idx, w, gu, dn.half())
    with pytest.raises(ValueError, match=r"topk_idx values must lie in \[0, E=3\)"):
        moe_dispatch(x, idx + 1, w, gu, dn)
    with pytest.raises(ValueError, match="floating dtype"):
        spec.validate(np.zeros((4, 8), np.int32), idx.numpy(), w.numpy(), gu.numpy(), dn.numpy())
    spec.validate_shapes(("N", 8), ("N", 2), ("N", 2), ("E", 10, 8), ("E", 8, 5))  # symbolic dims: no complaint


def test_scales_need_fp8_weights():
    # MoEDispatchFP8 (tests/plugins/moe_dispatch/test_fp8.py): scales come with E4M3 weights only
    x, idx, w, gu, dn = make_inputs(2, 8, 4, 2, 1)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        moe_dispatch(x, idx, w, gu, dn, w_gate_up_scale=torch.ones(1, 1), w_down_scale=torch.ones(1, 1))
