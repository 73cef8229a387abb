"""MoEDispatch's body in standard ONNX ops: the portable fallback every model carries.

Dense over experts: every expert runs on every token as one batched MatMul over E,
then a dense [N,E] routing matrix (zero for unselected experts) combines them.
Memory is E*N*(2I+D), never N*k*2I*D (per-token gathered weight matrices).
Backends replace it with sparse kernels (TensorRT plugin, com.microsoft.MoE).
"""

import onnx
import onnx.helper
import onnxscript
from onnxscript import opset23 as op
from onnxscript.values import Opset

from dsv3_export.plugins import DOMAIN, DOMAIN_VERSION, PLUGIN_NAMESPACE, PLUGIN_VERSION
from dsv3_export.plugins import register_schema as register
from dsv3_export.plugins.moe_dispatch import spec

OPSET = 23  # default-domain opset of the body (ORT 1.31 runs it)
dsv3 = Opset(DOMAIN, DOMAIN_VERSION)


# plugin_* are unused by the body but declared (with defaults) so the nodes that
# carry them match the function's signature; ORT 1.31 also accepts them undeclared.
@onnxscript.script(dsv3, default_opset=op)
def MoEDispatch(x, topk_idx, topk_weight, w_gate_up, w_down, plugin_namespace: str = PLUGIN_NAMESPACE, plugin_version: str = PLUGIN_VERSION):
    gate_up = op.MatMul(x, op.Transpose(w_gate_up, perm=[0, 2, 1]))  # [N,D]@[E,D,2I] -> [E,N,2I]
    gate, up = op.Split(gate_up, axis=-1, num_outputs=2)  # rows :I are gate, I: are up
    h = op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)  # silu(gate) * up
    y_e = op.MatMul(h, op.Transpose(w_down, perm=[0, 2, 1]))  # [E,N,I]@[E,I,D] -> [E,N,D]

    # Dense routing weights [N,E]; "add" so repeated experts would sum (top-k never repeats).
    # Scattered in float32: ORT's CPU ScatterElements has no float16 "add"; exact for
    # distinct experts, since each cell holds one weight cast back unchanged.
    n_e = op.Concat(op.Shape(x, start=0, end=1), op.Shape(w_down, start=0, end=1), axis=0)
    zeros = op.ConstantOfShape(n_e)  # float32 zeros
    route = op.ScatterElements(zeros, topk_idx, op.Cast(topk_weight, to=onnx.TensorProto.FLOAT), axis=1, reduction="add")
    route = op.Unsqueeze(op.Transpose(op.CastLike(route, x), perm=[1, 0]), [2])  # [E,N,1]
    y = op.ReduceSum(op.Mul(y_e, route), [0], keepdims=0)  # [N,D]
    return y


# MoEDispatchFP8: each [E, rows, cols] E4M3 weight is dequantized by DequantizeLinear with
# block_size=128 along cols, its [E, ceil(rows/128), ceil(cols/128)] scale first repeated 128 times
# along rows; then the body above. Dense over experts, like MoEDispatch's body.
@onnxscript.script(dsv3, default_opset=op)
def MoEDispatchFP8(x, topk_idx, topk_weight, w_gate_up, w_down, w_gate_up_scale, w_down_scale, plugin_namespace: str = PLUGIN_NAMESPACE, plugin_version: str = PLUGIN_VERSION):
    block = op.Constant(value_ints=[128])
    gs_shape = op.Concat(op.Shape(w_gate_up_scale, start=0, end=2), block, op.Shape(w_gate_up_scale, start=2, end=3), axis=0)
    gs_rows = op.Concat(op.Shape(w_gate_up_scale, start=0, end=1), op.Constant(value_ints=[-1]), op.Shape(w_gate_up_scale, start=2, end=3), axis=0)
    gs = op.Reshape(op.Expand(op.Unsqueeze(w_gate_up_scale, [2]), gs_shape), gs_rows)
    gs = op.Slice(gs, op.Constant(value_ints=[0]), op.Shape(w_gate_up, start=1, end=2), op.Constant(value_ints=[1]))
    wgu = op.CastLike(op.DequantizeLinear(w_gate_up, gs, axis=2, block_size=128), x)
    ds_shape = op.Concat(op.Shape(w_down_scale, start=0, end=2), block, op.Shape(w_down_scale, start=2, end=3), axis=0)
    ds_rows = op.Concat(op.Shape(w_down_scale, start=0, end=1), op.Constant(value_ints=[-1]), op.Shape(w_down_scale, start=2, end=3), axis=0)
    ds = op.Reshape(op.Expand(op.Unsqueeze(w_down_scale, [2]), ds_shape), ds_rows)
    ds = op.Slice(ds, op.Constant(value_ints=[0]), op.Shape(w_down, start=1, end=2), op.Constant(value_ints=[1]))
    wd = op.CastLike(op.DequantizeLinear(w_down, ds, axis=2, block_size=128), x)

    gate_up = op.MatMul(x, op.Transpose(wgu, perm=[0, 2, 1]))
    gate, up = op.Split(gate_up, axis=-1, num_outputs=2)
    h = op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)
    y_e = op.MatMul(h, op.Transpose(wd, perm=[0, 2, 1]))
    n_e = op.Concat(op.Shape(x, start=0, end=1), op.Shape(w_down, start=0, end=1), axis=0)
    zeros = op.ConstantOfShape(n_e)
    route = op.ScatterElements(zeros, topk_idx, op.Cast(topk_weight, to=onnx.TensorProto.FLOAT), axis=1, reduction="add")
    route = op.Unsqueeze(op.Transpose(op.CastLike(route, x), perm=[1, 0]), [2])
    y = op.ReduceSum(op.Mul(y_e, route), [0], keepdims=0)
    return y


def function_proto() -> onnx.FunctionProto:
    return MoEDispatch.to_function_proto()


def fp8_function_proto() -> onnx.FunctionProto:
    return MoEDispatchFP8.to_function_proto()


def make_node(x: str, topk_idx: str, topk_weight: str, w_gate_up: str, w_down: str, y: str, *, name: str | None = None) -> onnx.NodeProto:
    """One dsv3 node with all the attributes the contract requires."""
    return onnx.helper.make_node(
        spec.OP_NAME, [x, topk_idx, topk_weight, w_gate_up, w_down], [y], name=name, domain=spec.OP_DOMAIN,
        plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION,
    )


_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def register_schema() -> None:
    register(spec.OP_NAME,
             [("x", "T"), ("topk_idx", "I"), ("topk_weight", "T"), ("w_gate_up", "T"), ("w_down", "T")],
             [("y", "T")], [("T", _FLOATS, ""), ("I", ["tensor(int64)"], "")],
             {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION})


def register_fp8_schema() -> None:
    register(spec.FP8_OP_NAME,
             [("x", "T"), ("topk_idx", "I"), ("topk_weight", "T"), ("w_gate_up", "F8"), ("w_down", "F8"),
              ("w_gate_up_scale", "S"), ("w_down_scale", "S")],
             [("y", "T")], [("T", _FLOATS, ""), ("I", ["tensor(int64)"], ""), ("F8", ["tensor(float8e4m3fn)"], ""),
                            ("S", ["tensor(float)"], "")],
             {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION})


def torch_translation(x, topk_idx, topk_weight, w_gate_up, w_down):
    """torch.onnx translation of torch.ops.dsv3.moe_dispatch: one dsv3 node, attributes included."""
    register_schema()
    return dsv3[spec.OP_NAME](x, topk_idx, topk_weight, w_gate_up, w_down,
                              plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION)
