"""LatentAttention contract: absorbed-MLA attention over the latent cache (docs/design.md, "Custom ops").

    q [B,S,H,C], latent [B,T,C]  ->  o_lat [B,S,H,r],   C = r + dr, r = kv_lora_rank

MQA with one shared head: K = latent (all C), V = latent[..., :r]; causal with
offset T-S (query s sees keys t <= T-S+s); softmax in float32.
"""

import numbers

from plugins import DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION

OP_NAME = "LatentAttention"
OP_DOMAIN = DOMAIN
INPUTS = ("q", "latent")
OUTPUTS = ("o_lat",)
# Required attributes have default None; plugin_* are carried by every node.
ATTRIBUTES = {
    "scale": None,
    "kv_lora_rank": None,
    "plugin_namespace": PLUGIN_NAMESPACE,
    "plugin_version": PLUGIN_VERSION,
}
# Math in float32 for the model dtypes (the ONNX body always casts to FLOAT);
# float64 is accepted so tests can check the reference to 1e-10 in float64.
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def output_shape(q_shape, latent_shape, kv_lora_rank):
    """[B,S,H,r]. Only indexes the dims, so they may be ints or symbolic
    (ONNX dim names, TensorRT shape expressions)."""
    b, s, h, _ = q_shape
    return (b, s, h, kv_lora_rank)


def _known(*dims) -> bool:
    # Symbolic dims (None, 'batch', shape expressions) are left to run time.
    return all(isinstance(d, int) for d in dims)


def validate_shapes(q_shape, latent_shape, kv_lora_rank) -> None:
    if len(q_shape) != 4:
        raise ValueError(f"LatentAttention: q must have rank 4 [B,S,H,C], got shape {tuple(q_shape)}")
    if len(latent_shape) != 3:
        raise ValueError(f"LatentAttention: latent must have rank 3 [B,T,C], got shape {tuple(latent_shape)}")
    (b, s, _, c), (lb, t, lc) = q_shape, latent_shape
    if _known(c, lc) and c != lc:
        raise ValueError(f"LatentAttention: q's last dim ({c}) must equal latent's last dim ({lc}) = kv_lora_rank + rope dim")
    if _known(b, lb) and b != lb:
        raise ValueError(f"LatentAttention: batch of q ({b}) and latent ({lb}) differ")
    if not isinstance(kv_lora_rank, int) or kv_lora_rank <= 0:
        raise ValueError(f"LatentAttention: kv_lora_rank must be a positive int, got {kv_lora_rank!r}")
    if _known(lc) and kv_lora_rank >= lc:
        raise ValueError(f"LatentAttention: kv_lora_rank ({kv_lora_rank}) must be < latent's last dim ({lc}); C = kv_lora_rank + rope dim")
    # S > T would leave the first queries with no key to attend (softmax of all -inf).
    if _known(s, t) and s > t:
        raise ValueError(f"LatentAttention: q has more positions (S={s}) than latent (T={t}); latent must include the new tokens")


def validate(q, latent, scale, kv_lora_rank) -> None:
    """Checks tensors (torch or numpy: anything with .shape and .dtype) against the contract."""
    validate_shapes(tuple(q.shape), tuple(latent.shape), kv_lora_rank)
    qd, ld = (str(t.dtype).removeprefix("torch.") for t in (q, latent))
    if qd not in FLOAT_DTYPES:
        raise ValueError(f"LatentAttention: q must be a floating dtype {FLOAT_DTYPES}, got {qd}")
    if qd != ld:
        raise ValueError(f"LatentAttention: q ({qd}) and latent ({ld}) must have the same dtype")
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise ValueError(f"LatentAttention: scale must be a float, got {scale!r}")
