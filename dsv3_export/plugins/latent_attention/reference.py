"""LatentAttention in plain torch: the math the ONNX body and kernels must match."""

import torch

from dsv3_export.plugins.latent_attention import spec


def _has_values(t: torch.Tensor) -> bool:
    # Under torch.export / torch.compile the lengths are symbolic: leave the range to run time.
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


def latent_attention(q: torch.Tensor, latent: torch.Tensor, scale: float, kv_lora_rank: int,
                     cache_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """o_lat[b,s,h] = softmax_t(scale * q[b,s,h] . latent[b,t] + mask) @ latent[b,t,:r],
    mask = 0 where t <= L_b + s, -inf elsewhere (L_b = cache_lengths[b]).

    q [B,S,H,C], latent [B,T,C] (the cache buffer, new rows already at L_b..L_b+S-1),
    cache_lengths [B] int64/int32 or None (every row L_b = T - S, the contract
    before v2) -> [B,S,H,r]. Math in float32 whatever the input dtype (the
    softmax over thousands of keys needs it), output in q's dtype. Rows
    t >= L_b + S never reach the output, whatever they hold (NaN included).
    """
    spec.validate(q, latent, scale, kv_lora_rank, cache_lengths)
    bsz, s_len, t_len = q.shape[0], q.shape[1], latent.shape[1]
    if cache_lengths is None:
        lengths = torch.full((bsz,), t_len - s_len, dtype=torch.int64, device=q.device)
    else:
        lengths = cache_lengths.to(device=q.device, dtype=torch.int64)
        if lengths.numel() and _has_values(lengths):
            spec.validate_length_range(int(lengths.min()), int(lengths.max()), s_len, t_len)
    # float32 at least; float64 stays float64 (the reference is checked to 1e-10 in float64).
    acc = torch.promote_types(q.dtype, torch.float32)
    qf, lf = q.to(acc), latent.to(acc)
    pos_k = torch.arange(t_len, device=q.device)
    # Unwritten rows (t >= L_b + S) are zeroed: 0 * NaN garbage would poison the sum.
    written = pos_k[None, :] < (lengths + s_len)[:, None]  # [B,T]
    lf = torch.where(written[:, :, None], lf, torch.zeros((), dtype=acc, device=q.device))
    scores = scale * torch.einsum("bshc,btc->bsht", qf, lf)
    # Row b holds L_b past positions, then the S new ones: query s is at position L_b + s.
    pos_q = lengths[:, None] + torch.arange(s_len, device=q.device)[None, :]  # [B,S]
    visible = pos_k[None, None, :] <= pos_q[:, :, None]  # [B,S,T]
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    o_lat = torch.einsum("bsht,btr->bshr", probs, lf[..., :kv_lora_rank])
    return o_lat.to(q.dtype)


@torch.library.custom_op("dsv3::latent_attention", mutates_args=())
def latent_attention_op(q: torch.Tensor, latent: torch.Tensor, cache_lengths: torch.Tensor, scale: float,
                        kv_lora_rank: int) -> torch.Tensor:
    """The op as torch sees it: the model calls this, so torch.export keeps it as one node
    (inputs in the ONNX node's order: q, latent, cache_lengths)."""
    return latent_attention(q, latent, scale, kv_lora_rank, cache_lengths)


@latent_attention_op.register_fake
def _(q, latent, cache_lengths, scale, kv_lora_rank):
    spec.validate(q, latent, scale, kv_lora_rank, cache_lengths)
    return q.new_empty((*q.shape[:-1], kv_lora_rank))
