"""FP8 block numerics, DeepSeek's weight format: E4M3 values with one float32 multiplier per
128x128 block (scale = amax / 448), and 128-wide activation groups. The checkpoint reader, the
reference model, the MoEDispatch reference, the quantization pass, the kernels' tests and
tools/gpu_check.py all use these."""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite E4M3 value
FP8_BLOCK = 128  # DeepSeek's 128x128 weight blocks and 128-wide activation groups
FP8_ACT_EPS = 1e-4  # DeepSeek's act_quant: scale = max(amax, 1e-4) / 448


def dequantize_blocks(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK),
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 weight [..., out, in] times its per-block multiplier [..., ceil(out/bo), ceil(in/bi)],
    computed in float32, then cast to dtype."""
    bo, bi = block
    out, inp = w.shape[-2:]
    s = scale.float().repeat_interleave(bo, -2)[..., :out, :].repeat_interleave(bi, -1)[..., :inp]
    return (w.float() * s).to(dtype)


def quantize_blocks(w: torch.Tensor, block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 values [..., out, in], float32 multipliers [..., ceil(out/bo), ceil(in/bi)]) of w."""
    bo, bi = block
    out, inp = w.shape[-2:]
    po, pi = -out % bo, -inp % bi
    wf = torch.nn.functional.pad(w.float(), (0, pi, 0, po))
    blocks = wf.unflatten(-1, (-1, bi)).unflatten(-3, (-1, bo))  # [..., no, bo, ni, bi]
    amax = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.flatten(-2).flatten(-3, -2)[..., :out, :inp]
    return q.contiguous(), scale.float()

