"""Lower the graph to ONNX Runtime's native kernels (on by default for the ORT backend).

- MLA (lower_ort_mla.py): absorbed attention for decode, naive for prefill, chosen by an If on the
  query length; the per-head products as batched MatMul.
- MoEDispatch -> `com.microsoft.MoE` (sparse: only routed experts run). Its CPU kernel takes
  interleaved gate/up rows (`swiglu_fusion=1`) and does its own softmax + top-k routing; DeepSeek's
  routing stays exact by feeding log(weight) at the selected experts and −inf elsewhere (softmax
  then gives w/Σw, top-k picks exactly those) and multiplying the output by Σw. The shared experts
  join the same node as always-routed experts of weight 1; every expert is cut in two halves laid
  out so that the kernel's two threads each get one half of every chosen expert (MOE_PARTS).
- RMSNorm (x·rsqrt(mean(x²)+ε)·w, seven nodes as traced) -> `RMSNormalization` (opset 23).
- RoPE on interleaved pairs (thirteen nodes as traced) -> `com.microsoft.RotaryEmbedding`
  (interleaved=1), fed the graph's own cos/sin rows with position offset 0.

Each rule is a pattern -> replacement on onnxscript's rewriter; tests prove each equal to what it
replaces (tests/exporter/passes/test_lower_ort.py).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import pattern

from exporter.passes import lower_ort_mla as mla
from exporter.passes.ir_values import const_array, const_is, dims
from plugins import DOMAIN

# ORT's CPU MoE kernel gives each intra-op thread a fixed, contiguous block of the expert axis and
# runs an expert's GEMMs on one thread, so a decode step's few chosen experts often land on one thread
# while the other idles (expected load 3.4 expert-times instead of 2.5 for top-4 + 1 shared on 2
# threads). Cutting every expert in two along its intermediate axis and putting the first halves of
# all experts before all the second halves gives each of two threads one half of every chosen expert.
# Measured on `small`'s MoE (33 × 1024×512, 2 threads): 1 token 1.17 -> 0.98 ms, 2 tokens 2.09 -> 2.19,
# 128 tokens 25.8 -> 25.0, 1024 tokens 137 -> 127; ~6 % of a decode step (docs/performance.md).
# Exact: SiLU(gate)·up is per unit and the down projection is linear, so the pieces sum to the expert.
MOE_PARTS = 2


def _moe_dispatch(op, x, topk_idx, topk_weight, w_gate_up, w_down):
    return op.MoEDispatch(x, topk_idx, topk_weight, w_gate_up, w_down, _domain=DOMAIN,
                          _allow_other_attributes=True)


def _moe_dispatch_check(context, x, topk_idx, topk_weight, w_gate_up, w_down, **_) -> bool:
    # The gate/up rows are re-laid out at save time: only possible on a weight (an initializer).
    return w_gate_up.is_initializer() and w_gate_up.const_value is not None and topk_idx.shape is not None \
        and isinstance(topk_idx.shape[1], int) and dims(w_down) is not None and isinstance(dims(w_down)[0], int)


def _ort_moe(op, x, topk_idx, topk_weight, w_gate_up, w_down, routed: int, always: int = 0, parts: int = 1):
    """com.microsoft.MoE with DeepSeek's routing kept exact: log(weight) at the selected experts,
    −inf at the other `routed` ones, log(1) = 0 at the `always` experts stacked after them; the
    kernel's softmax then gives w/(Σw + always), so the output is scaled back by Σw + always. With
    experts cut into `parts` (piece p of expert j at p·(routed + always) + j), the router row is
    repeated per piece: every piece of a chosen expert is chosen, at w/(parts·(Σw + always))."""
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
    if parts > 1:
        router = op.Concat(*[router] * parts, axis=1)
        total = op.Mul(total, op.Constant(value_float=float(parts)))
    y = op.MoE(x, router, w_gate_up, None, w_down, _domain="com.microsoft", k=parts * (topk_idx.shape[1] + always),
               activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
               normalize_routing_weights=0)
    # ORT's CPU MoE kernel may write its output over its input x (the kernel allows in-place reuse)
    # but clears the output before reading x: when MoE is x's last reader the result is zeros.
    # A later reader of x that is exact (Where with a false condition picks y bit for bit) keeps x alive.
    return op.Where(op.Constant(value=ir.tensor(np.array(False))), x, op.Mul(y, total))


def _moe_native(op, x, topk_idx, topk_weight, w_gate_up, w_down, **_):
    e, _, inter = dims(w_down)
    parts = _expert_parts(inter)
    if parts == 1:
        _interleave_gate_up(w_gate_up)
        return _ort_moe(op, x, topk_idx, topk_weight, w_gate_up, w_down, routed=e)
    gate_up, down = w_gate_up.const_value, w_down.const_value

    def fill_gate_up(out: np.ndarray) -> None:
        w = gate_up.numpy()
        _fill_gate_up(out, 0, e, w[:, :inter], w[:, inter:], parts)

    def fill_down(out: np.ndarray) -> None:
        _fill_down(out, 0, e, down.numpy(), parts)

    gu, dn = _expert_weights(op, w_gate_up, w_down, e, inter, parts, fill_gate_up, fill_down, suffix="")
    return _ort_moe(op, x, topk_idx, topk_weight, gu, dn, routed=e, parts=parts)


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
    e = dims(w_gate_up)[0] + n
    parts = _expert_parts(inter)

    def fill_gate_up(out: np.ndarray) -> None:  # peak memory: the routed tensor plus the result
        w = routed.numpy()
        _fill_gate_up(out, 0, e, w[:, :inter], w[:, inter:], parts)
        del w
        _fill_gate_up(out, e - n, e, g.numpy().reshape(n, inter, -1), u.numpy().reshape(n, inter, -1), parts)

    def fill_down(out: np.ndarray) -> None:
        _fill_down(out, 0, e, down.numpy(), parts)
        _fill_down(out, e - n, e, d.numpy().reshape(d.shape[0], n, inter).transpose(1, 0, 2), parts)  # [n, D, I]

    gu, dn = _expert_weights(op, w_gate_up, w_down, e, inter, parts, fill_gate_up, fill_down, suffix=".with_shared")
    return _ort_moe(op, x, topk_idx, topk_weight, gu, dn, routed=e - n, always=n, parts=parts)


def _expert_parts(inter: int) -> int:
    """How many pieces each expert is cut into along its intermediate axis (see MOE_PARTS)."""
    return MOE_PARTS if inter % MOE_PARTS == 0 else 1


def _fill_gate_up(out: np.ndarray, first: int, total: int, gate: np.ndarray, up: np.ndarray, parts: int) -> None:
    """Experts first.. (gate, up: [n, I, D]) into out [parts·total, 2I/parts, D]: piece p of expert j
    at p·total + j, its rows interleaved (gate_0, up_0, gate_1, ...) for the kernel's fused SwiGLU."""
    n, inter = gate.shape[:2]
    width = inter // parts
    for p in range(parts):
        rows = out[p * total + first: p * total + first + n]
        rows[:, 0::2], rows[:, 1::2] = gate[:, p * width:(p + 1) * width], up[:, p * width:(p + 1) * width]


def _fill_down(out: np.ndarray, first: int, total: int, down: np.ndarray, parts: int) -> None:
    """Experts first.. (down: [n, D, I]) into out [parts·total, D, I/parts], piece p at p·total + j."""
    n, width = down.shape[0], down.shape[2] // parts
    for p in range(parts):
        out[p * total + first: p * total + first + n] = down[:, :, p * width:(p + 1) * width]


def _expert_weights(op, w_gate_up, w_down, e: int, inter: int, parts: int, fill_gate_up, fill_down, suffix: str):
    """New gate/up and down initializers for `e` experts cut into `parts`, written lazily (at save)."""
    d = dims(w_down)[1]
    tag = suffix + (f".parts{parts}" if parts > 1 else "")
    values = []
    for old, shape, fill in ((w_gate_up, (parts * e, 2 * inter // parts, d), fill_gate_up),
                             (w_down, (parts * e, d, inter // parts), fill_down)):
        dtype, name = old.const_value.dtype, f"{old.name}{tag}"

        def load(shape=shape, fill=fill, dtype=dtype, name=name) -> ir.Tensor:
            out = np.empty(shape, dtype.numpy())
            fill(out)
            return ir.Tensor(out, name=name)

        # the shape as a constant (E inside _ort_moe too): a Shape of the old weight would keep it in the file
        values.append(op.initializer(ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(shape), name=name)))
    values[0].meta["dsv3.interleaved"] = True
    return values


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
