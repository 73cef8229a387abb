"""MoEDispatchFP8 for ONNX Runtime: only the experts the call's tokens chose are read and dequantized.

MoEDispatchFP8's portable body (plugins/moe_dispatch/onnx_function.py) dequantizes every expert
of the layer on every call: 256 x 4096 x 7168 values at DeepSeek-V3's width, for a decode step
that uses 8 experts. Selecting experts first needs an indexing op on E4M3 tensors, and ONNX has
none that ONNX Runtime runs (Gather and Slice do not take float8 types; Pad does, but ORT has no
float8 Pad kernel). So the lowered graph keeps the same bytes as uint8 codes:

1. chosen = Unique(topk_idx) (sorted; U <= min(E, N*k) experts);
2. their codes and 128x128 block scales gathered: [U, rows, cols] uint8, [U, rows/128, cols/128];
3. each code looked up in the 256-entry table of E4M3 values (exact, NaN codes included) and
   multiplied by its block's scale: what DequantizeLinear computes, for U experts instead of E;
4. the body's SwiGLU experts over U, each token's output summed over its chosen experts with
   their weights, in ascending expert order as the body sums them.

The weights stay as DeepSeek stored them (E4M3 bytes, the same file bytes). The bytes read per
token are those of its chosen experts: benchmarks.memory_bound counts a stack gathered by the
output of a Unique as an expert stack.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from dsv3_export.core.fp8 import FP8_BLOCK
from dsv3_export.exporter.expert_stack import ExpertStack
from dsv3_export.exporter.passes.ir_values import dims
from dsv3_export.plugins import DOMAIN
from dsv3_export.plugins.moe_dispatch import spec

E4M3_VALUES = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def _fp8_dispatch(op, x, topk_idx, topk_weight, w_gate_up, w_down, s_gate_up, s_down):
    return op.MoEDispatchFP8(x, topk_idx, topk_weight, w_gate_up, w_down, s_gate_up, s_down, _domain=DOMAIN,
                             _allow_other_attributes=True)


def _fp8_dispatch_check(context, x, topk_idx, topk_weight, w_gate_up, w_down, s_gate_up, s_down, **_) -> bool:
    weights = (w_gate_up, w_down, s_gate_up, s_down)
    return all(w.is_initializer() and w.const_value is not None and dims(w) is not None
               and all(isinstance(d, int) for d in dims(w)) for w in weights)


def _codes(op, value: ir.Value) -> ir.Value:
    """The E4M3 stack's bytes as a uint8 initializer, written expert by expert like the original."""
    stack = ExpertStack.of(value.const_value, value.name)
    return op.initializer(ExpertStack(stack.count, lambda i: stack.checked_slab(i).view(np.uint8), stack.slab_shape,
                                      ir.DataType.UINT8, name=f"{value.name}.e4m3_codes"))


def _chosen_dequantized(op, codes: ir.Value, scale: ir.Value, chosen, shape: tuple[int, int, int], x):
    """[U, rows, cols] values (x's dtype) of the chosen experts: table[code] x block scale."""
    _, rows, cols = shape
    nb_r, nb_c = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    table = op.Constant(value=ir.tensor(E4M3_VALUES))
    values = op.Gather(table, op.Cast(op.Gather(codes, chosen, axis=0), to=ir.DataType.INT32), axis=0)
    blocks = op.Unsqueeze(op.Unsqueeze(op.Gather(scale, chosen, axis=0), op.Constant(value_ints=[2])),
                          op.Constant(value_ints=[4]))  # [U, nb_r, 1, nb_c, 1]
    blocks = op.Expand(blocks, op.Constant(value_ints=[1, nb_r, FP8_BLOCK, nb_c, FP8_BLOCK]))
    per_value = op.Reshape(blocks, op.Constant(value_ints=[-1, nb_r * FP8_BLOCK, nb_c * FP8_BLOCK]))
    if (nb_r * FP8_BLOCK, nb_c * FP8_BLOCK) != (rows, cols):
        per_value = op.Slice(per_value, op.Constant(value_ints=[0, 0]), op.Constant(value_ints=[rows, cols]),
                             op.Constant(value_ints=[1, 2]))
    return op.CastLike(op.Mul(values, per_value), x)


def _fp8_chosen_native(op, x, topk_idx, topk_weight, w_gate_up, w_down, s_gate_up, s_down, **_):
    chosen, _, _, _ = op.Unique(op.Reshape(topk_idx, op.Constant(value_ints=[-1])), sorted=1, _outputs=4)
    wgu = _chosen_dequantized(op, _codes(op, w_gate_up), s_gate_up, chosen, dims(w_gate_up), x)
    wd = _chosen_dequantized(op, _codes(op, w_down), s_down, chosen, dims(w_down), x)
    gate, up = op.Split(op.MatMul(x, op.Transpose(wgu, perm=[0, 2, 1])), axis=-1, num_outputs=2, _outputs=2)
    y_e = op.MatMul(op.Mul(op.Mul(gate, op.Sigmoid(gate)), up), op.Transpose(wd, perm=[0, 2, 1]))  # [U, N, D]
    # route[n, u]: the weight token n gives chosen expert u (0 when it did not choose it), in float32
    hit = op.Cast(op.Equal(op.Unsqueeze(topk_idx, op.Constant(value_ints=[2])), chosen), to=ir.DataType.FLOAT)
    weight = op.Unsqueeze(op.Cast(topk_weight, to=ir.DataType.FLOAT), op.Constant(value_ints=[2]))
    route = op.ReduceSum(op.Mul(hit, weight), op.Constant(value_ints=[1]), keepdims=0)  # [N, U]
    route = op.Unsqueeze(op.Transpose(op.CastLike(route, x), perm=[1, 0]), op.Constant(value_ints=[2]))
    return op.ReduceSum(op.Mul(y_e, route), op.Constant(value_ints=[0]), keepdims=0)


RULE = pattern.RewriteRule(_fp8_dispatch, _fp8_chosen_native, _fp8_dispatch_check, name=f"{spec.FP8_OP_NAME}-chosen")
