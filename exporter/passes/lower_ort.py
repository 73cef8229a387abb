"""Lower the graph to ONNX Runtime's native kernels (on by default for the ORT backend).

- MLA (lower_ort_mla.py): absorbed attention for decode, naive for prefill, chosen by an If on the
  query length; the per-head products as batched MatMul.
- MoEDispatch -> `com.microsoft.MoE` (sparse: only routed experts run). Its CPU kernel takes
  interleaved gate/up rows (`swiglu_fusion=1`) and does its own softmax + top-k routing; DeepSeek's
  routing stays exact by feeding log(weight) at the selected experts and −inf elsewhere (softmax
  then gives w/Σw, top-k picks exactly those) and multiplying the output by Σw. The shared experts
  join the same node as always-routed experts of weight 1.
- RMSNorm (x·rsqrt(mean(x²)+ε)·w, seven nodes as traced) -> `RMSNormalization` (opset 23).
- RoPE on interleaved pairs (thirteen nodes as traced) -> `com.microsoft.RotaryEmbedding`
  (interleaved=1), fed the graph's own cos/sin rows with position offset 0.

Each rule is a pattern -> replacement on onnxscript's rewriter; tests prove each equal to what it
replaces (tests/passes/test_lower_ort.py).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import pattern

from plugins import DOMAIN

from . import lower_ort_mla as mla
from .lower_ort_mla import const_array, const_is, dims


def _moe_dispatch(op, x, topk_idx, topk_weight, w_gate_up, w_down):
    return op.MoEDispatch(x, topk_idx, topk_weight, w_gate_up, w_down, _domain=DOMAIN,
                          _allow_other_attributes=True)


def _moe_dispatch_check(context, x, topk_idx, topk_weight, w_gate_up, w_down, **_) -> bool:
    # The gate/up rows are re-laid out at save time: only possible on a weight (an initializer).
    return w_gate_up.is_initializer() and w_gate_up.const_value is not None and topk_idx.shape is not None \
        and isinstance(topk_idx.shape[1], int) and dims(w_down) is not None and isinstance(dims(w_down)[0], int)


def _ort_moe(op, x, topk_idx, topk_weight, w_gate_up, w_down, routed: int, always: int = 0):
    """com.microsoft.MoE with DeepSeek's routing kept exact: log(weight) at the selected experts,
    −inf at the other `routed` ones, log(1) = 0 at the `always` experts stacked after them; the
    kernel's softmax then gives w/(Σw + always), so the output is scaled back by Σw + always."""
    rows = op.Shape(x, start=0, end=1)
    neg_inf = op.ConstantOfShape(op.Concat(rows, op.Constant(value_ints=[routed]), axis=0),
                                 value=ir.tensor(np.array([-np.inf], np.float32)))
    router = op.ScatterElements(neg_inf, topk_idx, op.Log(topk_weight), axis=1)
    total = op.ReduceSum(topk_weight, op.Constant(value_ints=[1]), keepdims=1)
    if always:
        zeros = op.ConstantOfShape(op.Concat(rows, op.Constant(value_ints=[always]), axis=0),
                                   value=ir.tensor(np.array([0.0], np.float32)))
        router = op.Concat(router, zeros, axis=1)
        total = op.Add(total, op.Constant(value_float=float(always)))
    y = op.MoE(x, router, w_gate_up, None, w_down, _domain="com.microsoft", k=topk_idx.shape[1] + always,
               activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
               normalize_routing_weights=0)
    # ORT's CPU MoE kernel may write its output over its input x (the kernel allows in-place reuse)
    # but clears the output before reading x: when MoE is x's last reader the result is zeros.
    # A later reader of x that is exact (Where with a false condition picks y bit for bit) keeps x alive.
    return op.Where(op.Constant(value=ir.tensor(np.array(False))), x, op.Mul(y, total))


def _moe_native(op, x, topk_idx, topk_weight, w_gate_up, w_down, **_):
    _interleave_gate_up(w_gate_up)
    return _ort_moe(op, x, topk_idx, topk_weight, w_gate_up, w_down, routed=dims(w_down)[0])


def _moe_with_shared(op, x, topk_idx, topk_weight, w_gate_up, w_down, w1, w3, w2):
    routed = op.MoEDispatch(x, topk_idx, topk_weight, w_gate_up, w_down, _domain=DOMAIN, _allow_other_attributes=True)
    gate = op.Gemm(x, w1, _allow_other_attributes=True, _outputs=["gate"])
    up = op.Gemm(x, w3, _allow_other_attributes=True, _outputs=["up"])
    shared = op.Gemm(op.Mul(op.Mul(gate, op.Sigmoid(gate)), up), w2, _allow_other_attributes=True, _outputs=["down"])
    return op.Add(routed, shared)


def _moe_with_shared_check(context, x, topk_idx, topk_weight, w_gate_up, w_down, w1, w3, w2, gate, up, down,
                           **_) -> bool:
    if not _moe_dispatch_check(context, x, topk_idx, topk_weight, w_gate_up, w_down):
        return False
    for gemm in (gate, up, down):
        a = gemm.producer().attributes
        if a.get_int("transA", 0) != 0 or a.get_int("transB", 0) != 1 or a.get_float("alpha", 1.0) != 1.0:
            return False
    weights = (w1, w3, w2, w_down)
    if not all(w.is_initializer() and w.const_value is not None for w in weights):
        return False
    inter = dims(w_gate_up)[1] // 2
    shared = dims(w1)[0]
    return dims(w3) == dims(w1) and dims(w2) == (dims(w1)[1], shared) and shared % inter == 0


def _moe_with_shared_native(op, x, topk_idx, topk_weight, w_gate_up, w_down, w1, w3, w2, **_):
    """The shared expert(s) become extra experts of the same MoE node, always routed, weight 1: one
    kernel instead of three GEMMs and two elementwise nodes (~0.2 ms a layer per decode step on
    `small`, measured). A shared MLP n times an expert's width is n experts: SiLU·up is per unit and
    the down projection is linear, so the split sums back exactly."""
    inter = dims(w_gate_up)[1] // 2
    n = dims(w1)[0] // inter
    routed, down, g, u, d = (v.const_value for v in (w_gate_up, w_down, w1, w3, w2))

    def gate_up() -> ir.Tensor:  # written in place: peak memory is the routed tensor plus the result
        w = routed.numpy()
        out = np.empty((w.shape[0] + n, *w.shape[1:]), w.dtype)
        out[: w.shape[0], 0::2], out[: w.shape[0], 1::2] = w[:, :inter], w[:, inter:]
        del w
        out[-n:, 0::2], out[-n:, 1::2] = g.numpy().reshape(n, inter, -1), u.numpy().reshape(n, inter, -1)
        return ir.Tensor(out, name=f"{w_gate_up.name}.with_shared")

    def downs() -> ir.Tensor:
        extra = d.numpy().reshape(d.shape[0], n, inter).transpose(1, 0, 2)  # [n, D, I]
        return ir.Tensor(np.concatenate([down.numpy(), extra]), name=f"{w_down.name}.with_shared")

    e = dims(w_gate_up)[0] + n
    gu_shape, down_shape = ir.Shape([e, *dims(w_gate_up)[1:]]), ir.Shape([e, *dims(w_down)[1:]])
    gu = op.initializer(ir.LazyTensor(gate_up, dtype=routed.dtype, shape=gu_shape, name=f"{w_gate_up.name}.with_shared"))
    dn = op.initializer(ir.LazyTensor(downs, dtype=down.dtype, shape=down_shape, name=f"{w_down.name}.with_shared"))
    gu.meta["dsv3.interleaved"] = True
    # E as a constant inside _ort_moe: a Shape of the old w_down would keep that weight in the file
    return _ort_moe(op, x, topk_idx, topk_weight, gu, dn, routed=e - n, always=n)


def _interleave_gate_up(value: ir.Value) -> None:
    """[E, 2I, D] rows (gate 0..I-1, up 0..I-1) -> (gate0, up0, gate1, up1, ...), lazily."""
    if value.meta.get("dsv3.interleaved"):
        return
    original = value.const_value

    def load() -> ir.Tensor:
        w = original.numpy()
        inter = w.shape[1] // 2
        out = np.empty_like(w)
        out[:, 0::2], out[:, 1::2] = w[:, :inter], w[:, inter:]
        return ir.Tensor(out, name=value.name)

    value.const_value = ir.LazyTensor(load, dtype=original.dtype, shape=original.shape, name=value.name)
    value.meta["dsv3.interleaved"] = True


# ---- RMSNorm ------------------------------------------------------------------------------------
def _rms_norm(op, x, two, axes, eps, weight):
    mean_square = op.ReduceMean(op.Pow(x, two), axes, _allow_other_attributes=True, _outputs=["mean_square"])
    return op.Mul(weight, op.Mul(x, op.Reciprocal(op.Sqrt(op.Add(mean_square, eps)))))


def _rms_norm_check(context, x, two, axes, eps, weight, mean_square, **_) -> bool:
    node = mean_square.producer()
    keep = node.attributes.get("keepdims")
    rank = len(dims(x)) if dims(x) is not None else None
    return (const_is(two, 2.0) and (keep is None or keep.as_int() == 1) and rank is not None
            and (const_is(axes, [-1]) or const_is(axes, [rank - 1])) and const_array(eps) is not None and const_array(eps).size == 1
            and dims(weight) is not None and len(dims(weight)) == 1 and dims(weight)[0] == dims(x)[-1])


def _rms_norm_native(op, x, two, axes, eps, weight, **_):
    return op.RMSNormalization(x, weight, axis=-1, epsilon=float(const_array(eps).reshape(())), stash_type=1)


# ---- RoPE on interleaved pairs ------------------------------------------------------------------
def _rope(op, x, pair_shape, i0, i1, cos, sin, axis_re, axis_im, out_shape):
    pairs = op.Reshape(x, pair_shape, _allow_other_attributes=True, _outputs=["pairs"])
    x0 = op.Gather(pairs, i0, _allow_other_attributes=True, _outputs=["x0"])
    x1 = op.Gather(pairs, i1, _allow_other_attributes=True, _outputs=["x1"])
    re = op.Sub(op.Mul(x0, cos), op.Mul(x1, sin))
    im = op.Add(op.Mul(x0, sin), op.Mul(x1, cos))
    stacked = op.Concat(op.Unsqueeze(re, axis_re), op.Unsqueeze(im, axis_im), axis=-1)
    return op.Reshape(stacked, out_shape, _allow_other_attributes=True)


def _rope_check(context, x, pair_shape, i0, i1, cos, sin, axis_re, axis_im, pairs, x0, x1, **_) -> bool:
    xs, cs = dims(x), dims(cos)
    if xs is None or cs is None or len(xs) != 4 or not all(isinstance(d, int) for d in xs[2:]):
        return False
    last = len(dims(pairs)) - 1 if dims(pairs) is not None else None
    gather_axis = [n.producer().attributes.get_int("axis", 0) for n in (x0, x1)]
    return (const_is(i0, 0) and const_is(i1, 1) and last is not None and all(a in (-1, last) for a in gather_axis)
            and const_is(axis_re, [-1]) and const_is(axis_im, [-1]) and dims(sin) == cs and len(cs) == 4
            and cs[0] == 1 and cs[2] == 1 and cs[3] == xs[3] // 2 and xs[3] % 2 == 0)


def _rope_native(op, x, cos, sin, out_shape, **_):
    heads, half = dims(x)[2], dims(x)[3] // 2
    table = op.Constant(value_ints=[-1, half])  # [1,S,1,dr/2] -> rows 0..S-1 of the cos/sin cache
    flat = op.Reshape(x, op.Constant(value_ints=[0, 0, -1]))
    rotated = op.RotaryEmbedding(flat, op.Constant(value_ints=[0]), op.Reshape(cos, table), op.Reshape(sin, table),
                                 _domain="com.microsoft", interleaved=1, num_heads=heads)
    return op.Reshape(rotated, out_shape)


# Multi-node fusions first: they must see the nodes before RULES rewrite their parts.
FUSIONS = [
    *mla.FUSIONS,
    pattern.RewriteRule(_moe_with_shared, _moe_with_shared_native, _moe_with_shared_check, name="MoEWithSharedToMoE"),
]
RULES = [
    *mla.RULES,
    pattern.RewriteRule(_moe_dispatch, _moe_native, _moe_dispatch_check, name="MoEDispatchToMoE"),
    pattern.RewriteRule(_rms_norm, _rms_norm_native, _rms_norm_check, name="RMSNormToRMSNormalization"),
    pattern.RewriteRule(_rope, _rope_native, _rope_check, name="RopeToRotaryEmbedding"),
]


def lower_ort(model: ir.Model) -> ir.Model:
    pattern.RewriteRuleSet(FUSIONS).apply_to_model(model)
    pattern.RewriteRuleSet(RULES).apply_to_model(model)
    model.opset_imports.setdefault("com.microsoft", 1)
    # What the rules left unused: the dsv3 function bodies, the norms' ε and exponent constants.
    ir.passes.PassManager([common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(),
                           common.RemoveUnusedOpsetsPass()])(model)
    return model
