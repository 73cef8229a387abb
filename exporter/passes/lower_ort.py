"""Lower the custom ops to ONNX Runtime's native kernels (on by default for the ORT backend).

- LatentAttention -> opset-23 `Attention` as MQA with one KV head: K = latent, V = latent[..., :r],
  3-D Q [B, S, H·C] (no transposes), an explicit causal mask with offset T−S (the op's own
  `is_causal` aligns top-left, which is wrong for decode).
- MoEDispatch -> `com.microsoft.MoE` (sparse: only routed experts run). Its CPU kernel takes
  interleaved gate/up rows (`swiglu_fusion=1`) and does its own softmax + top-k routing; DeepSeek's
  routing stays exact by feeding log(weight) at the selected experts and −inf elsewhere (softmax
  then gives w/Σw, top-k picks exactly those) and multiplying the output by Σw.

Each rule is a pattern -> replacement on onnxscript's rewriter; tests prove both equal to the
function bodies they replace.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from plugins import DOMAIN


def _latent_attention(op, q, latent):
    return op.LatentAttention(q, latent, _domain=DOMAIN, _allow_other_attributes=True, _outputs=["o_lat"])


def _latent_attention_native(op, q, latent, o_lat, **_):
    node = o_lat.producer()
    scale = node.attributes["scale"].as_float()
    rank = node.attributes["kv_lora_rank"].as_int()
    heads = q.shape[2] if q.shape is not None else None
    if not isinstance(heads, int):
        raise ValueError(f"{node.name}: LatentAttention needs a static head count to lower, got q shape {q.shape}")
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    s_len = op.Squeeze(op.Shape(q, start=1, end=2))
    t_len = op.Squeeze(op.Shape(latent, start=1, end=2))
    pos_q = op.Add(op.Range(zero, s_len, one), op.Sub(t_len, s_len))
    axis0, axis1 = op.Constant(value_ints=[0]), op.Constant(value_ints=[1])
    visible = op.LessOrEqual(op.Unsqueeze(op.Range(zero, t_len, one), axis0), op.Unsqueeze(pos_q, axis1))  # [S,T]
    values = op.Slice(latent, axis0, op.Constant(value_ints=[rank]), op.Constant(value_ints=[2]))
    q3 = op.Reshape(q, op.Constant(value_ints=[0, 0, -1]))
    o3 = op.Attention(q3, latent, values, visible, q_num_heads=heads, kv_num_heads=1, scale=scale)
    return op.Reshape(o3, op.Constant(value_ints=[0, 0, heads, rank]))


def _moe_dispatch(op, x, topk_idx, topk_weight, w_gate_up, w_down):
    return op.MoEDispatch(x, topk_idx, topk_weight, w_gate_up, w_down, _domain=DOMAIN,
                          _allow_other_attributes=True)


def _moe_dispatch_check(context, x, topk_idx, topk_weight, w_gate_up, w_down, **_) -> bool:
    # The gate/up rows are re-laid out at save time: only possible on a weight (an initializer).
    return w_gate_up.is_initializer() and w_gate_up.const_value is not None and topk_idx.shape is not None \
        and isinstance(topk_idx.shape[1], int)


def _moe_native(op, x, topk_idx, topk_weight, w_gate_up, w_down, **_):
    _interleave_gate_up(w_gate_up)
    k = topk_idx.shape[1]
    n_e = op.Concat(op.Shape(x, start=0, end=1), op.Shape(w_down, start=0, end=1), axis=0)
    neg_inf = op.ConstantOfShape(n_e, value=ir.tensor(np.array([-np.inf], np.float32)))
    router = op.ScatterElements(neg_inf, topk_idx, op.Log(topk_weight), axis=1)
    y = op.MoE(x, router, w_gate_up, None, w_down, _domain="com.microsoft", k=k, activation_type="swiglu",
               swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=0)
    y = op.Mul(y, op.ReduceSum(topk_weight, op.Constant(value_ints=[1]), keepdims=1))
    # ORT's CPU MoE kernel may write its output over its input x (the kernel allows in-place reuse)
    # but clears the output before reading x: when MoE is x's last reader the result is zeros.
    # A later reader of x that is exact (Where with a false condition picks y bit for bit) keeps x alive.
    return op.Where(op.Constant(value=ir.tensor(np.array(False))), x, y)


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


RULES = [
    pattern.RewriteRule(_latent_attention, _latent_attention_native, name="LatentAttentionToAttention"),
    pattern.RewriteRule(_moe_dispatch, _moe_native, _moe_dispatch_check, name="MoEDispatchToMoE"),
]


def lower_ort(model: ir.Model) -> ir.Model:
    pattern.RewriteRuleSet(RULES).apply_to_model(model)
    model.opset_imports.setdefault("com.microsoft", 1)
    # The dsv3 bodies are no longer called: keep the graph free of dead functions.
    used = {(n.domain, n.op_type) for n in ir.traversal.RecursiveGraphIterator(model.graph)}
    for key in [k for k in model.functions if (k[0], k[1]) not in used]:
        del model.functions[key]
    if not any(d == DOMAIN for d, _ in used):
        model.opset_imports.pop(DOMAIN, None)
    return model
