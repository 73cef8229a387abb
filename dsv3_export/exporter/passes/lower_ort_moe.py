"""MoE for ONNX Runtime, in one of two forms (`dsv3-export build --moe`).

fused (default): MoEDispatch and the shared-expert MLP -> one `com.microsoft.MoE` node. Its CPU
  kernel takes interleaved gate/up rows (`swiglu_fusion=1`) and does its own softmax + top-k;
  DeepSeek's routing stays exact by feeding log(weight) at the chosen experts and -inf elsewhere
  and scaling the output back by the weights' sum. The shared experts join as always-routed
  experts of weight 1; every expert is cut in two halves so that each of two threads gets one half
  of every chosen expert (MOE_PARTS). The expert weights stay as stored until a token needs them.

per-expert: each expert its own two MatMuls over the tokens routed to it:
1. the step's (token, expert) pairs, the shared experts as experts every token is routed to at
   weight 1, sorted by expert (TopK over the expert ids), their rows gathered once;
2. one Split hands each expert its rows (an expert no token chose gets zero rows, and its MatMuls
   return at once);
3. per expert MatMul [D, 2I] -> SwiGLU -> MatMul [I, D] against its own weights, stored [in, out]
   so that ONNX Runtime prepacks them at session start;
4. the outputs put back in pair order, weighted and summed over each token's k slots (a token's
   sum does not depend on what else shares the step).

Why two: the MoE kernel runs each expert on one thread and multiplies it by MlasGemm on the
weights as stored, so an expert with two or more tokens is repacked on every call; separate MatMuls
read prepacked weights and split each product over the threads, but pay a few nodes per expert
even when it is idle, and prepack every expert when the session starts. One `small` MoE layer
(32 + 1 experts of 1024x512, 2 threads, fresh routing every call), fused against per-expert: 1 token
1.27 vs 1.44 ms, 2 tokens 2.30 vs 2.06, 4: 4.49 vs 3.19, 8: 7.41 vs 4.97, 128: 27.9 vs 23.1. Batched
decode and prefill want per-expert, one sequence at a time wants fused (docs/performance.md). Both
are the same products up to float summation order.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from dsv3_export.core.build_options import MOE_FORMS
from dsv3_export.exporter.expert_stack import ExpertStack
from dsv3_export.exporter.passes.ir_values import dims
from dsv3_export.exporter.quant_numerics import SharedLoads
from dsv3_export.plugins import DOMAIN

# Routed experts' weights are named <stack>.expert<j>: benchmarks.memory_bound counts them as read
# only when chosen (k of the routed ones per token), the shared experts' as read every step.
ROUTED_EXPERT_WEIGHT = re.compile(r"\.expert\d+$")


def _moe_dispatch(op, x, topk_idx, topk_weight, w_gate_up, w_down):
    return op.MoEDispatch(x, topk_idx, topk_weight, w_gate_up, w_down, _domain=DOMAIN,
                          _allow_other_attributes=True)


def _moe_dispatch_check(context, x, topk_idx, topk_weight, w_gate_up, w_down, **_) -> bool:
    # The experts are split into separate weights at save time: only possible on initializers.
    return all(w.is_initializer() and w.const_value is not None for w in (w_gate_up, w_down)) \
        and topk_idx.shape is not None and isinstance(topk_idx.shape[1], int) \
        and dims(w_down) is not None and all(isinstance(d, int) for d in dims(w_down))


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
        if a.get_int("transA", 0) != 0 or a.get_int("transB", 0) != 1 or a.get_float("alpha", 1.0) != 1.0 \
                or len(gemm.producer().inputs) > 2:
            return False
    if not all(w.is_initializer() and w.const_value is not None for w in (w1, w3, w2)):
        return False
    inter = dims(w_gate_up)[1] // 2
    shared = dims(w1)[0]
    return dims(w3) == dims(w1) and dims(w2) == (dims(w1)[1], shared) and shared % inter == 0


# ---- per-expert: each expert its own MatMuls ------------------------------------------------------
def _shared_weight(op, name: str, loads: SharedLoads, key: str, parts: int, make, pick, shape, dtype) -> ir.Value:
    """An initializer holding pick(make()) ([in, out], C order), made when the saver writes it; make()
    (the shared MLP's weights) runs once for the `parts` weights cut from it."""
    def load() -> ir.Tensor:
        return ir.Tensor(np.ascontiguousarray(pick(loads.get(key, parts, make))), name=name)

    return op.initializer(ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(shape), name=name))


def _routed_weights(op, w_gate_up, w_down) -> list[tuple[ir.Value, ir.Value]]:
    """(gate_up [D, 2I], down [I, D]) of every routed expert, cut from the stacks [E, 2I, D], [E, D, I]
    one expert at a time."""
    e, two_i, d = dims(w_gate_up)
    gate_up, down = _stack(w_gate_up), _stack(w_down)
    out = []
    for j in range(e):
        gu = _expert_weight(op, f"{w_gate_up.name}.expert{j}", gate_up, j, (d, two_i))
        dn = _expert_weight(op, f"{w_down.name}.expert{j}", down, j, (two_i // 2, d))
        out.append((gu, dn))
    return out


def _stack(value: ir.Value) -> ExpertStack:
    return ExpertStack.of(value.const_value, value.name)


def _expert_weight(op, name: str, stack: ExpertStack, j: int, shape) -> ir.Value:
    """Expert j of the stack as [in, out] (C order), made when the saver writes it."""
    def load() -> ir.Tensor:
        return ir.Tensor(np.ascontiguousarray(stack.checked_slab(j).T), name=name)

    return op.initializer(ir.LazyTensor(load, dtype=stack.dtype, shape=ir.Shape(shape), name=name))


def _shared_weights(op, w1, w3, w2, inter: int, loads: SharedLoads) -> list[tuple[ir.Value, ir.Value]]:
    """The shared MLP (gate, up [n·I, D], down [D, n·I]) as n experts of width I: SiLU(gate)·up is per
    unit and the down projection is linear, so the pieces sum back to the MLP exactly."""
    n, d = dims(w1)[0] // inter, dims(w1)[1]
    out = []
    for s in range(n):
        rows = slice(s * inter, (s + 1) * inter)
        gu = _shared_weight(op, f"{w1.name}.shared{s}", loads, "gate_up", n,
                            lambda: np.stack([w1.const_value.numpy(), w3.const_value.numpy()]),  # [2, n·I, D]
                            lambda w, rows=rows: w[:, rows].reshape(2 * inter, -1).T, (d, 2 * inter), w1.dtype)
        dn = _shared_weight(op, f"{w2.name}.shared{s}", loads, w2.name, n, w2.const_value.numpy,
                            lambda w, rows=rows: w[:, rows].T, (inter, d), w2.dtype)
        out.append((gu, dn))
    return out


def _experts(op, x, idx, weight, experts: list[tuple[ir.Value, ir.Value]], shared: int):
    """y[t] = Σ_pairs weight · expert(x[t]); idx/weight [N, k] routed, then `shared` always-on experts."""
    total = len(experts)
    one, minus_one = op.Constant(value_ints=[1]), op.Constant(value_ints=[-1])
    weight = op.Cast(weight, to=ir.DataType.FLOAT)
    if shared:
        rows = op.Shape(x, start=0, end=1)
        always = op.Constant(value=ir.tensor(np.arange(total - shared, total, dtype=np.int64)[None]))
        idx = op.Concat(idx, op.Expand(always, op.Concat(rows, op.Constant(value_ints=[shared]), axis=0)), axis=1)
        ones = op.ConstantOfShape(op.Concat(rows, op.Constant(value_ints=[shared]), axis=0),
                                  value=ir.tensor(np.array([1.0], np.float32)))
        weight = op.Concat(weight, ones, axis=1)
    k = op.Shape(idx, start=1, end=2)
    flat = op.Reshape(idx, minus_one)  # pair p = (token p // k, expert flat[p])
    pairs = op.Shape(flat)
    _, order = op.TopK(op.Cast(flat, to=ir.DataType.FLOAT), pairs, largest=0, sorted=1, _outputs=2)
    _, back = op.TopK(op.Cast(order, to=ir.DataType.FLOAT), pairs, largest=0, sorted=1, _outputs=2)  # order⁻¹
    counts = op.ReduceSum(op.Cast(op.Equal(op.Unsqueeze(flat, one), op.Constant(
        value=ir.tensor(np.arange(total, dtype=np.int64)))), to=ir.DataType.INT64), op.Constant(value_ints=[0]), keepdims=0)
    rows_of = op.Split(op.Gather(x, op.Div(order, k), axis=0), counts, axis=0, _outputs=total)
    outs = []
    for rows, (gate_up, down) in zip(rows_of, experts):
        gate, up = op.Split(op.MatMul(rows, gate_up), axis=-1, num_outputs=2, _outputs=2)
        outs.append(op.MatMul(op.Mul(op.Mul(gate, op.Sigmoid(gate)), up), down))
    # Back to pair order and summed per token over its k slots. Not ScatterND(add): ONNX Runtime's
    # CPU kernel races on repeated indices (wrong sums now and then with 2 threads, measured).
    per_pair = op.Reshape(op.Gather(op.Concat(*outs, axis=0), back, axis=0),
                          op.Concat(op.Shape(idx), op.Shape(x, start=1), axis=0))  # [N, k, D]
    scale = op.CastLike(op.Unsqueeze(weight, op.Constant(value_ints=[2])), x)
    return op.ReduceSum(op.Mul(per_pair, scale), one, keepdims=0)


def _per_expert_native(op, x, topk_idx, topk_weight, w_gate_up, w_down, **_):
    return _experts(op, x, topk_idx, topk_weight, _routed_weights(op, w_gate_up, w_down), shared=0)


def _per_expert_with_shared_native(op, x, topk_idx, topk_weight, w_gate_up, w_down, w1, w3, w2, **_):
    loads = SharedLoads()
    shared = _shared_weights(op, w1, w3, w2, dims(w_gate_up)[1] // 2, loads)
    experts = _routed_weights(op, w_gate_up, w_down) + shared
    return _experts(op, x, topk_idx, topk_weight, experts, shared=len(shared))


# ---- fused: ONNX Runtime's MoE kernel ------------------------------------------------------------
# ORT's CPU MoE kernel gives each intra-op thread a fixed, contiguous block of the expert axis and
# runs an expert's GEMMs on one thread, so a decode step's few chosen experts often land on one thread
# while the other idles (expected load 3.4 expert-times instead of 2.5 for top-4 + 1 shared on 2
# threads). Cutting every expert in two along its intermediate axis and putting the first halves of
# all experts before all the second halves gives each of two threads one half of every chosen expert.
# Measured on `small`'s MoE (33 × 1024×512, 2 threads): 1 token 1.17 -> 0.98 ms, 2 tokens 2.09 -> 2.19,
# 128 tokens 25.8 -> 25.0, 1024 tokens 137 -> 127; ~6 % of a decode step (docs/performance.md).
# Exact: SiLU(gate)·up is per unit and the down projection is linear, so the pieces sum to the expert.
MOE_PARTS = 2


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


def _fused_native(op, x, topk_idx, topk_weight, w_gate_up, w_down, **_):
    e, _, inter = dims(w_down)
    parts = _expert_parts(inter)
    gu, dn = _expert_weights(op, w_gate_up, w_down, _stack(w_gate_up).checked_slab, _stack(w_down).checked_slab,
                             e, inter, parts, suffix="")
    return _ort_moe(op, x, topk_idx, topk_weight, gu, dn, routed=e, parts=parts)


def _fused_with_shared_native(op, x, topk_idx, topk_weight, w_gate_up, w_down, w1, w3, w2, **_):
    """The shared expert(s) become extra experts of the same MoE node, always routed, weight 1: one
    kernel instead of three GEMMs and two elementwise nodes (~0.2 ms a layer per decode step on
    `small`, measured). A shared MLP n times an expert's width is n experts: SiLU·up is per unit and
    the down projection is linear, so the split sums back exactly."""
    inter = dims(w_gate_up)[1] // 2
    n = dims(w1)[0] // inter
    routed = dims(w_gate_up)[0]
    gate_up, down, g, u, d = _stack(w_gate_up), _stack(w_down), w1.const_value, w3.const_value, w2.const_value

    def expert_gate_up(j: int) -> np.ndarray:  # [2I, D]: gate rows, then up rows
        if j < routed:
            return gate_up.checked_slab(j)
        rows = slice((j - routed) * inter, (j - routed + 1) * inter)
        return np.concatenate([g.numpy()[rows], u.numpy()[rows]])

    def expert_down(j: int) -> np.ndarray:  # [D, I]
        if j < routed:
            return down.checked_slab(j)
        return d.numpy()[:, (j - routed) * inter:(j - routed + 1) * inter]

    parts = _expert_parts(inter)
    gu, dn = _expert_weights(op, w_gate_up, w_down, expert_gate_up, expert_down, routed + n, inter, parts,
                             suffix=".with_shared")
    return _ort_moe(op, x, topk_idx, topk_weight, gu, dn, routed=routed, always=n, parts=parts)


def _expert_parts(inter: int) -> int:
    """How many pieces each expert is cut into along its intermediate axis (see MOE_PARTS)."""
    return MOE_PARTS if inter % MOE_PARTS == 0 else 1


def _expert_weights(op, w_gate_up, w_down, gate_up, down, e: int, inter: int, parts: int, suffix: str):
    """New gate/up [parts·e, 2I/parts, D] and down [parts·e, D, I/parts] stacks for `e` experts
    (gate_up(j) [2I, D], down(j) [D, I]) cut into `parts`: piece p of expert j at p·e + j, its
    gate/up rows interleaved (gate_0, up_0, gate_1, ...) for the kernel's fused SwiGLU. Written
    one piece at a time."""
    d, width = dims(w_down)[1], inter // parts
    tag = suffix + (f".parts{parts}" if parts > 1 else ".fused")

    def gate_up_piece(i: int) -> np.ndarray:
        p, j = divmod(i, e)
        w = gate_up(j)
        out = np.empty((2 * width, d), w.dtype)
        out[0::2], out[1::2] = w[p * width:(p + 1) * width], w[inter + p * width: inter + (p + 1) * width]
        return out

    def down_piece(i: int) -> np.ndarray:
        p, j = divmod(i, e)
        return down(j)[:, p * width:(p + 1) * width]

    values = []
    for old, piece, shape in ((w_gate_up, gate_up_piece, (2 * width, d)), (w_down, down_piece, (d, width))):
        stack = ExpertStack(parts * e, piece, shape, old.const_value.dtype, name=f"{old.name}{tag}")
        # the shape as a constant (E inside _ort_moe too): a Shape of the old weight would keep it in the file
        values.append(op.initializer(stack))
    values[0].meta["dsv3.interleaved"] = True
    return values


FORMS = MOE_FORMS
# Per form: the multi-node fusion first (it must see the shared MLP's Gemms before anything rewrites
# them), then the rule for a MoEDispatch alone.
_NATIVE = {"fused": (_fused_with_shared_native, _fused_native),
           "per-expert": (_per_expert_with_shared_native, _per_expert_native)}


def rules(form: str) -> tuple[list, list]:
    """(fusions, rules) lowering MoEDispatch to `form`."""
    with_shared, alone = _NATIVE[form]
    return ([pattern.RewriteRule(_moe_with_shared, with_shared, _moe_with_shared_check, name=f"MoEWithShared-{form}")],
            [pattern.RewriteRule(_moe_dispatch, alone, _moe_dispatch_check, name=f"MoEDispatch-{form}")])
