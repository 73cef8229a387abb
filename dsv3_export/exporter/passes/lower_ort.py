"""Lower the graph to ONNX Runtime's native kernels (on by default for the ORT backend).

- MLA (lower_ort_mla.py): absorbed attention for decode, naive for prefill, chosen by an If on the
  query length; the per-head products as batched MatMul.
- MoE (lower_ort_moe.py): MoEDispatch and the shared-expert MLP -> ONNX Runtime's `MoE` kernel
  ("fused", the default) or each expert's own two MatMuls over its tokens ("per-expert").
- FP8 MoE (lower_ort_moe_fp8.py): MoEDispatchFP8 -> its chosen experts gathered and dequantized
  (as uint8 codes through the E4M3 table: ONNX Runtime cannot index float8 tensors).
- RMSNorm (x·rsqrt(mean(x²)+ε)·w, seven nodes as traced) -> `RMSNormalization` (opset 23).
- RoPE on interleaved pairs (thirteen nodes as traced) -> `com.microsoft.RotaryEmbedding`
  (interleaved=1), fed the graph's own cos/sin rows with position offset 0.

Each rule is a pattern -> replacement on onnxscript's rewriter; tests prove each equal to what it
replaces (tests/exporter/passes/test_lower_ort.py).
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import pattern

from dsv3_export.exporter.passes import lower_ort_mla as mla
from dsv3_export.exporter.passes import lower_ort_moe as moe
from dsv3_export.exporter.passes import lower_ort_moe_fp8 as moe_fp8
from dsv3_export.exporter.passes.ir_values import const_array, const_is, dims


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
            and cs[2] == 1 and cs[3] == xs[3] // 2 and xs[3] % 2 == 0)


def _rope_native(op, x, cos, sin, out_shape, **_):
    """The angles the graph computed become RotaryEmbedding's cos/sin cache, one row per token:
    [1,S,1,dr/2] (every row at the same positions) read at 0..S-1, or per row [B,S,1,dr/2] (graph
    contract v2: each row at its own positions) read at b·S + s."""
    heads, half = dims(x)[2], dims(x)[3] // 2
    table = op.Constant(value_ints=[-1, half])
    flat = op.Reshape(x, op.Constant(value_ints=[0, 0, -1]))
    if dims(cos)[0] == 1:
        positions = op.Constant(value_ints=[0])
    else:
        batch_seq = op.Shape(x, start=0, end=2)
        count = op.ReduceProd(batch_seq, keepdims=0)
        positions = op.Reshape(op.Range(op.Constant(value_int=0), count, op.Constant(value_int=1)), batch_seq)
    rotated = op.RotaryEmbedding(flat, positions, op.Reshape(cos, table), op.Reshape(sin, table),
                                 _domain="com.microsoft", interleaved=1, num_heads=heads)
    return op.Reshape(rotated, out_shape)


# Multi-node fusions first: they must see the nodes before RULES rewrite their parts.
FUSIONS = [*mla.FUSIONS]
RULES = [
    *mla.RULES,
    pattern.RewriteRule(_rms_norm, _rms_norm_native, _rms_norm_check, name="RMSNormToRMSNormalization"),
    pattern.RewriteRule(_rope, _rope_native, _rope_check, name="RopeToRotaryEmbedding"),
    moe_fp8.RULE,
]


def lower_ort(model: ir.Model, moe_form: str = "fused") -> ir.Model:
    """Every rule applied; the experts in `moe_form` (lower_ort_moe.FORMS)."""
    if moe_form not in moe.FORMS:
        raise ValueError(f"moe_form must be one of {moe.FORMS}, got {moe_form!r}")
    moe_fusions, moe_rules = moe.rules(moe_form)
    pattern.RewriteRuleSet(FUSIONS + moe_fusions).apply_to_model(model)
    pattern.RewriteRuleSet(RULES + moe_rules).apply_to_model(model)
    model.opset_imports.setdefault("com.microsoft", 1)
    # What the rules left unused: the dsv3 function bodies, the norms' ε and exponent constants.
    ir.passes.PassManager([common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(),
                           common.RemoveUnusedOpsetsPass()])(model)
    return model
