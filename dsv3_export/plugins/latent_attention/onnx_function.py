"""LatentAttention's body in standard ONNX ops: the FunctionProto every model carries.

Any ONNX runtime inlines this; TensorRT maps the node to the plugin instead.
Dynamic B, S, H, T: every size comes from Shape at run time; the per-row
causal offsets from the cache_lengths input (int64 [B]).
"""

import onnx
import onnx.helper
import onnxscript
from onnx.defs import OpSchema
from onnxscript import opset23 as op
from onnxscript.values import Opset

from dsv3_export.plugins import DOMAIN, DOMAIN_VERSION, PLUGIN_NAMESPACE, PLUGIN_VERSION
from dsv3_export.plugins import register_schema as register
from dsv3_export.plugins.latent_attention import spec

OPSET = 23  # default-domain opset of the body (ORT 1.31 runs it)
dsv3 = Opset(DOMAIN, DOMAIN_VERSION)


# plugin_* are unused by the body but declared (with defaults) so the nodes that
# carry them match the function's signature; ORT 1.31 also accepts them undeclared.
@onnxscript.script(dsv3, default_opset=op)
def LatentAttention(q, latent, cache_lengths, scale: float, kv_lora_rank: int, plugin_namespace: str = PLUGIN_NAMESPACE, plugin_version: str = PLUGIN_VERSION):
    qf = op.Cast(q, to=onnx.TensorProto.FLOAT)  # [B,S,H,C]
    lf = op.Cast(latent, to=onnx.TensorProto.FLOAT)  # [B,T,C]
    keys = op.Unsqueeze(op.Transpose(lf, perm=[0, 2, 1]), [1])  # [B,1,C,T]: one head shared by all H
    scores = op.Mul(op.MatMul(qf, keys), op.Constant(value_float=scale))  # [B,S,H,T]

    # Query s of row b sits at position L_b + s (L_b = cache_lengths[b]) and sees keys 0..L_b+s.
    s_len = op.Squeeze(op.Shape(q, start=1, end=2))
    t_len = op.Squeeze(op.Shape(latent, start=1, end=2))
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    pos_q = op.Add(op.Unsqueeze(cache_lengths, [1]), op.Unsqueeze(op.Range(zero, s_len, one), [0]))  # [B,S]
    pos_k = op.Range(zero, t_len, one)  # [T]
    visible = op.LessOrEqual(pos_k, op.Unsqueeze(pos_q, [2, 3]))  # [T] vs [B,S,1,1] -> [B,S,1,T]
    neg_inf = op.Constant(value_float=float("-inf"))
    probs = op.Softmax(op.Where(visible, scores, neg_inf), axis=-1)  # broadcasts over H

    rank = op.Reshape(op.Constant(value_int=kv_lora_rank), [1])
    values = op.Slice(lf, op.Constant(value_ints=[0]), rank, op.Constant(value_ints=[2]))  # V = latent[..., :r]
    # Rows t >= L_b + S are unwritten: zero them, as 0 * NaN garbage would poison the sum.
    written = op.Less(op.Unsqueeze(pos_k, [0]), op.Unsqueeze(op.Add(cache_lengths, s_len), [1]))  # [B,T]
    values = op.Where(op.Unsqueeze(written, [2]), values, op.Constant(value_float=0.0))  # [B,T,r]
    o_f32 = op.MatMul(probs, op.Unsqueeze(values, [1]))  # [B,S,H,T]@[B,1,T,r] -> [B,S,H,r]
    o_lat = op.CastLike(o_f32, q)
    return o_lat


def function_proto() -> onnx.FunctionProto:
    return LatentAttention.to_function_proto()


def make_node(q: str, latent: str, cache_lengths: str, o_lat: str, *, scale: float, kv_lora_rank: int,
              name: str | None = None) -> onnx.NodeProto:
    """One dsv3 node (inputs q, latent, cache_lengths) with all the attributes the contract requires."""
    return onnx.helper.make_node(
        spec.OP_NAME, [q, latent, cache_lengths], [o_lat], name=name, domain=spec.OP_DOMAIN,
        scale=float(scale), kv_lora_rank=int(kv_lora_rank),
        plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION,
    )


_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def register_schema() -> None:
    register(spec.OP_NAME, [("q", "T"), ("latent", "T"), ("cache_lengths", "I")], [("o_lat", "T")],
             [("T", _FLOATS, ""), ("I", ["tensor(int64)"], "")],
             {"scale": OpSchema.AttrType.FLOAT, "kv_lora_rank": OpSchema.AttrType.INT,
              "plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION})


def torch_translation(q, latent, cache_lengths, scale: float, kv_lora_rank: int):
    """torch.onnx translation of torch.ops.dsv3.latent_attention: one dsv3 node, attributes included."""
    register_schema()
    return dsv3[spec.OP_NAME](q, latent, cache_lengths, scale=float(scale), kv_lora_rank=int(kv_lora_rank),
                              plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION)
