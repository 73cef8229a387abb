"""MoEDispatch in plain torch: the math the ONNX body and kernels must match."""

import torch
import torch.nn.functional as F

from dsv3_export.core.fp8 import dequantize_blocks
from dsv3_export.plugins.moe_dispatch import spec


def moe_dispatch(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    w_gate_up_scale: torch.Tensor | None = None,
    w_down_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[n] = sum_j topk_weight[n,j] * w_down[e] @ (silu(gate_e x_n) * up_e x_n), e = topk_idx[n,j].

    Like DeepSeek's inference MoE: visit only experts that received tokens,
    gather their tokens, run the SwiGLU expert, scatter-add the weighted result.
    Computed in x's dtype.
    """
    if w_gate_up_scale is not None or w_down_scale is not None:
        # MoEDispatchFP8: E4M3 weights times their 128x128 block scales, then the float op.
        spec.validate_fp8(x, topk_idx, topk_weight, w_gate_up, w_down, w_gate_up_scale, w_down_scale)
        w_gate_up = dequantize_blocks(w_gate_up, w_gate_up_scale, dtype=x.dtype)
        w_down = dequantize_blocks(w_down, w_down_scale, dtype=x.dtype)
    spec.validate(x, topk_idx, topk_weight, w_gate_up, w_down)
    inter = w_down.shape[-1]
    y = torch.zeros_like(x)
    counts = torch.bincount(topk_idx.flatten(), minlength=w_gate_up.shape[0])
    for e in torch.nonzero(counts).flatten().tolist():
        token, slot = torch.where(topk_idx == e)
        xe = x[token]
        gate, up = w_gate_up[e, :inter], w_gate_up[e, inter:]
        h = F.silu(xe @ gate.T) * (xe @ up.T)
        y.index_add_(0, token, (h @ w_down[e].T) * topk_weight[token, slot, None])
    return y


@torch.library.custom_op("dsv3::moe_dispatch", mutates_args=())
def moe_dispatch_op(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                    w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """The op as torch sees it: the model calls this, so torch.export keeps it as one node."""
    return moe_dispatch(x, topk_idx, topk_weight, w_gate_up, w_down)


@moe_dispatch_op.register_fake
def _(x, topk_idx, topk_weight, w_gate_up, w_down):
    return torch.empty_like(x)
