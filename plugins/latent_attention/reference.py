"""LatentAttention in plain torch: the math the ONNX body and kernels must match."""

import torch

from plugins.latent_attention import spec


def latent_attention(q: torch.Tensor, latent: torch.Tensor, scale: float, kv_lora_rank: int) -> torch.Tensor:
    """o_lat[b,s,h] = softmax_t(scale * q[b,s,h] . latent[b,t] + causal) @ latent[b,t,:r].

    q [B,S,H,C], latent [B,T,C] -> [B,S,H,r]. Math in float32 whatever the input
    dtype (the softmax over thousands of keys needs it), output in q's dtype.
    """
    spec.validate(q, latent, scale, kv_lora_rank)
    s_len, t_len = q.shape[1], latent.shape[1]
    # float32 at least; float64 stays float64 (the reference is checked to 1e-10 in float64).
    acc = torch.promote_types(q.dtype, torch.float32)
    qf, lf = q.to(acc), latent.to(acc)
    scores = scale * torch.einsum("bshc,btc->bsht", qf, lf)
    # The latent holds T-S past positions, then the S new ones: query s is at position T-S+s.
    pos_q = torch.arange(s_len, device=q.device) + (t_len - s_len)
    pos_k = torch.arange(t_len, device=q.device)
    visible = pos_k[None, :] <= pos_q[:, None]  # [S,T]
    scores = scores.masked_fill(~visible[None, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    o_lat = torch.einsum("bsht,btr->bshr", probs, lf[..., :kv_lora_rank])
    return o_lat.to(q.dtype)


@torch.library.custom_op("dsv3::latent_attention", mutates_args=())
def latent_attention_op(q: torch.Tensor, latent: torch.Tensor, scale: float, kv_lora_rank: int) -> torch.Tensor:
    """The op as torch sees it: the model calls this, so torch.export keeps it as one node."""
    return latent_attention(q, latent, scale, kv_lora_rank)


@latent_attention_op.register_fake
def _(q, latent, scale, kv_lora_rank):
    return q.new_empty((*q.shape[:-1], kv_lora_rank))
