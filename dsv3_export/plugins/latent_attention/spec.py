"""LatentAttention contract: absorbed-MLA attention over the latent cache (docs/design.md, "Custom ops").

    q [B,S,H,C], latent [B,T,C], cache_lengths [B] int64  ->  o_lat [B,S,H,r],   C = r + dr, r = kv_lora_rank

`latent` is each row's whole cache buffer (capacity T) after the S new rows were
written at positions L_b .. L_b+S-1, L_b = cache_lengths[b] (graph contract v2:
continuous batching over a buffer written in place). Query s of row b sits at
position L_b + s:

    o_lat[b,s,h] = softmax_t(scale * q[b,s,h] . latent[b,t]  +  (0 if t <= L_b + s else -inf)) @ latent[b,t,:r]

MQA with one shared head: K = latent (all C), V = latent[..., :r]; softmax in
float32. Rows t >= L_b + S are unwritten (garbage, zeros, even NaN) and get
exactly zero weight. 0 <= L_b and L_b + S <= T. The contract before v2 is the
special case L_b = T - S for every row (query s sees keys t <= T-S+s).
"""

import numbers

from dsv3_export.plugins import DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION

OP_NAME = "LatentAttention"
OP_DOMAIN = DOMAIN
INPUTS = ("q", "latent", "cache_lengths")
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
# The graph carries int64 (ONNX type constraint); torch / numpy / kernels also take int32.
LENGTH_DTYPES = ("int64", "int32")


def output_shape(q_shape, latent_shape, kv_lora_rank):
    """[B,S,H,r]. Only indexes the dims, so they may be ints or symbolic
    (ONNX dim names, TensorRT shape expressions)."""
    b, s, h, _ = q_shape
    return (b, s, h, kv_lora_rank)


def _known(*dims) -> bool:
    # Symbolic dims (None, 'batch', shape expressions) are left to run time.
    return all(isinstance(d, int) for d in dims)


def validate_shapes(q_shape, latent_shape, kv_lora_rank, cache_lengths_shape=None) -> None:
    """Shapes only (dims may be symbolic). cache_lengths_shape=None skips the
    lengths (callers that default them to T - S)."""
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
    # S > T: the S new rows cannot fit the buffer (L_b + S <= T fails for any L_b >= 0).
    if _known(s, t) and s > t:
        raise ValueError(f"LatentAttention: q has more positions (S={s}) than latent (T={t}); latent must include the new tokens")
    if cache_lengths_shape is not None:
        if len(cache_lengths_shape) != 1:
            raise ValueError("LatentAttention: cache_lengths must have rank 1 [B], "
                             f"got shape {tuple(cache_lengths_shape)}")
        (n,) = cache_lengths_shape
        if _known(b, n) and b != n:
            raise ValueError(f"LatentAttention: cache_lengths has {n} entries but the batch is B={b}")


def validate_length_range(min_length, max_length, s_len, t_len) -> None:
    """Values of cache_lengths (where they are available, e.g. the reference):
    0 <= L_b and L_b + S <= T."""
    if min_length < 0:
        raise ValueError(f"LatentAttention: cache_lengths must be >= 0, got {min_length}")
    if max_length + s_len > t_len:
        raise ValueError(f"LatentAttention: cache_lengths[b] + S must be <= T (the buffer's capacity), got "
                         f"max cache_lengths {max_length} + S={s_len} > T={t_len}")


def validate(q, latent, scale, kv_lora_rank, cache_lengths=None) -> None:
    """Checks tensors (torch or numpy: anything with .shape and .dtype) against the
    contract; shapes and dtypes only (values: validate_length_range)."""
    lengths_shape = None if cache_lengths is None else tuple(cache_lengths.shape)
    validate_shapes(tuple(q.shape), tuple(latent.shape), kv_lora_rank, lengths_shape)
    qd, ld = (str(t.dtype).removeprefix("torch.") for t in (q, latent))
    if qd not in FLOAT_DTYPES:
        raise ValueError(f"LatentAttention: q must be a floating dtype {FLOAT_DTYPES}, got {qd}")
    if qd != ld:
        raise ValueError(f"LatentAttention: q ({qd}) and latent ({ld}) must have the same dtype")
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise ValueError(f"LatentAttention: scale must be a float, got {scale!r}")
    if cache_lengths is not None:
        nd = str(cache_lengths.dtype).removeprefix("torch.")
        if nd not in LENGTH_DTYPES:
            raise ValueError(f"LatentAttention: cache_lengths must be an integer tensor {LENGTH_DTYPES}, got {nd}")
