"""Quantization numerics shared by the quantize pass, the reference emulation and the tests.

Integer weights are symmetric (no zero point; stored with the kernels' implicit offset 2^(bits-1)
where ORT wants unsigned bytes), one fp32 scale per output channel or per `block` inputs of one
output row. FP8 weights are DeepSeek's (exporter.weights.source_fp8). Everything here is torch on
the CPU; the pass calls it lazily, one tensor at a time.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dsv3_export.core.fp8 import FP8_ACT_EPS, FP8_BLOCK, FP8_DTYPE, FP8_MAX, dequantize_blocks
from dsv3_export.exporter.model import Linear, MoE
from dsv3_export.exporter.precision_policy import HEAD_BITS, HEAD_BLOCK, INT8_ACT_EPS, Policy, Scheme, is_head
from dsv3_export.exporter.weights import expert_of, expert_tensor, source_fp8, source_tensor


# ---- activations (the torch emulation of the graph's Q/DQ) ----------------------------------------
def fp8_act_quant(x: torch.Tensor, group: int = FP8_BLOCK) -> torch.Tensor:
    """DeepSeek's act_quant and back: per token, per `group` channels, scale = max(amax, 1e-4)/448,
    E4M3 round-to-nearest-even. A partial last group is its own group."""
    k = x.shape[-1]
    xp = F.pad(x.float(), (0, -k % group)).unflatten(-1, (-1, group))
    scale = xp.abs().amax(-1, keepdim=True).clamp(min=FP8_ACT_EPS) / FP8_MAX
    y = (xp / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * scale
    return y.flatten(-2)[..., :k].to(x.dtype)


def int8_act_quant(x: torch.Tensor) -> torch.Tensor:
    """Symmetric dynamic per-token int8 and back: scale = max(amax, eps)/127, round half to even."""
    scale = x.float().abs().amax(-1, keepdim=True).clamp(min=INT8_ACT_EPS) / 127.0
    return (torch.round(x.float() / scale).clamp(-127, 127) * scale).to(x.dtype)


ACT_QUANT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"fp8-group128": fp8_act_quant,
                                                                 "int8-token": int8_act_quant}


# ---- integer weights ------------------------------------------------------------------------------
def quantize_int(w: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (q int8 in [-qmax, qmax], scale [..., out, nblocks] fp32), qmax =
    2^(bits-1) - 1; block 0 = one block per row (per output channel). A partial last block gets its
    own scale from its own values."""
    qmax = 2 ** (bits - 1) - 1
    k = w.shape[-1]
    size = block or k
    wp = F.pad(w.float(), (0, -k % size)).unflatten(-1, (-1, size))
    scale = wp.abs().amax(-1).clamp(min=1e-12) / qmax
    q = torch.round(wp / scale[..., None]).clamp(-qmax, qmax).to(torch.int8)
    return q.flatten(-2)[..., :k].contiguous(), scale.float()


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    k = q.shape[-1]
    s = scale.repeat_interleave(block or k, -1)[..., :k]
    return q.float() * s


def unsigned(q: torch.Tensor, bits: int) -> np.ndarray:
    """Symmetric values -> the unsigned codes ORT's kernels take with their default zero point
    2^(bits-1), packed two per byte (low nibble first) for 4 bits."""
    u = (q.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8).numpy()
    if bits == 4:
        if u.shape[-1] % 2:
            u = np.concatenate([u, np.full(u.shape[:-1] + (1,), 8, np.uint8)], -1)
        u = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(u)


def matmulnbits_blob(q: torch.Tensor, bits: int, block: int) -> np.ndarray:
    """q [N, K] -> MatMulNBits' B [N, ceil(K/block), block*bits/8]; the padding of a partial last
    block holds the zero point (dequantizes to 0)."""
    n, k = q.shape
    padded = torch.zeros(n, -(-k // block) * block, dtype=torch.int8)
    padded[:, :k] = q
    return unsigned(padded, bits).reshape(n, -1, block * bits // 8)


def onnx_int4(q: torch.Tensor) -> np.ndarray:
    return q.numpy().astype(ml_dtypes.int4)


def fp8_numpy(q: torch.Tensor) -> np.ndarray:
    return q.contiguous().view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)


# ---- expert blocks --------------------------------------------------------------------------------
def expert_block(preferred: int, dim: int, inter: int) -> int:
    """QMoE's block along the input axis: it must divide both D and I and be a power of two >= 16;
    the largest such block up to `preferred`, else 0 (per output channel)."""
    b = preferred
    while b >= 16:
        if dim % b == 0 and inter % b == 0:
            return b
        b //= 2
    return 0


def interleave_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., 2I, X] gate rows then up rows -> (gate0, up0, gate1, up1, ...), QMoE's fused SwiGLU."""
    inter = t.shape[-2] // 2
    out = torch.empty_like(t)
    out[..., 0::2, :], out[..., 1::2, :] = t[..., :inter, :], t[..., inter:, :]
    return out


# ---- what the graph computes with ------------------------------------------------------------------
def weight_role(fqn: str) -> str:
    """linear | head (an LM head) | einsum (absorbed W_UK/W_UV) | experts | embedding."""
    if fqn.endswith(("ffn.w_gate_up", "ffn.w_down")):
        return "experts"
    if is_head(fqn):
        return "head"
    if fqn.endswith(("attn.w_uk", "attn.w_uv")):
        return "einsum"
    if fqn.endswith("embed.weight"):
        return "embedding"
    return "linear"


def quantized_int(source, fqn: str, scheme: Scheme, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer (q, scale) of a weight in its parameter layout ([..., out, in]). The embedding and the
    per-head einsum weights are always 8-bit per row: they are dequantized by DequantizeLinear, whose
    int4 kernel in ORT is 5x slower than its int8 one (measured: 5 vs 1 ms per decode step on
    `small`), and they are small."""
    w = source_tensor(source, fqn, torch.float32)
    role = weight_role(fqn)
    if role in ("embedding", "einsum"):
        return quantize_int(w, 8, 0)
    if role == "head":
        return quantize_int(w, HEAD_BITS, HEAD_BLOCK)
    return quantize_int(w, scheme.bits, block)


def quantized_expert(source, fqn: str, e: int, scheme: Scheme, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e of quantized_int(source, fqn, ...) for an expert stack: the same values (its scales
    are per row or per block of one row, so one expert quantizes alone)."""
    prefix, rest = expert_of(source, fqn)
    return quantize_int(expert_tensor(source, prefix, rest, e, torch.float32), scheme.bits, block)


def graph_weight(source, fqn: str, policy: Policy, block: int | None = None) -> torch.Tensor:
    """The fp32 value the quantized graph holds for parameter `fqn` (dequantized; expert padding
    cut), in the reference model's layout: the weights of the emulated reference."""
    scheme = policy.scheme
    role = weight_role(fqn)
    if policy.precision == "fp8" and role != "embedding":
        q, scale = source_fp8(source, fqn)
        if role == "experts":
            w = dequantize_blocks(q, scale)
            cfg = source.config
            inter = cfg.moe_inter_dim
            if fqn.endswith("w_down"):
                return w[..., :inter].contiguous()
            padded = w.shape[1] // 2
            return torch.cat([w[:, :inter], w[:, padded: padded + inter]], 1)
        return q.float() * scale.repeat_interleave(FP8_BLOCK, -1)[..., : q.shape[-1]]
    if role in ("embedding", "einsum"):  # per row (quantize.py: per-axis DequantizeLinear)
        block = 0
    elif role == "head":
        block = HEAD_BLOCK
    elif block is None:
        block = scheme.block
    q, scale = quantized_int(source, fqn, scheme, block)
    return dequantize_int(q, scale, block)


class SharedLoads:
    """Several initializers (weight, scales) come from one quantization: compute it once when the
    saver asks for the first, hand out the parts, forget it after the last (peak: one tensor)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[object, int]] = {}

    def get(self, key: str, parts: int, make: Callable[[], object]):
        with self._lock:
            if key not in self._cache:
                self._cache[key] = (make(), parts)
            value, left = self._cache[key]
            if left <= 1:
                del self._cache[key]
            else:
                self._cache[key] = (value, left - 1)
            return value


def nbytes(shape, bits: int) -> int:
    return math.ceil(math.prod(shape) * bits / 8)


# ---- the emulated reference -----------------------------------------------------------------------
def is_quantized(decision: str) -> bool:
    return decision != "kept" and not decision.startswith("float")


def emulate(model, source, policy: Policy, decisions: dict[str, str] | None = None):
    """Turn a reference `Transformer` into the quantized graph's twin: every weight the build
    quantized (`decisions`, fqn -> what the pass did; default policy.decisions) replaced by its
    dequantized value, and the graph's activation quantization applied in front of each quantized
    Linear (and, fp8, of the routed experts). Kernel-internal activation quantization (QMoE,
    MatMulNBits accuracy_level 4) is not emulated."""
    decisions = policy.decisions if decisions is None else decisions
    cfg = source.config
    act = ACT_QUANT.get(policy.scheme.act) if policy.scheme and policy.scheme.act else None
    moe_block = expert_block(policy.scheme.moe_block, cfg.dim, cfg.moe_inter_dim) if policy.scheme else 0
    modules = dict(model.named_modules())
    with torch.no_grad():
        for fqn, param in list(model.named_parameters()):
            if not is_quantized(decisions.get(fqn, "kept")):
                continue
            role = weight_role(fqn)
            w = graph_weight(source, fqn, policy, block=moe_block if role == "experts" else None).to(model.dtype)
            owner_name, attr = fqn.rsplit(".", 1)
            owner = modules[owner_name]
            if isinstance(owner, Linear):
                owner.weight, owner.scale = nn.Parameter(w, requires_grad=False), None
            else:
                param.copy_(w)
            # fp8 heads are plain fp8 Linears; the integer precisions' heads are weight-only
            takes_act = role == "linear" or (role == "head" and policy.precision == "fp8")
            if act is not None and takes_act and hasattr(owner, "act_quant"):  # Linear, Gate
                owner.act_quant = act
            if role == "experts" and policy.precision == "fp8" and attr == "w_gate_up":
                parent = modules[owner_name]
                if isinstance(parent, MoE):
                    parent.act_quant = fp8_act_quant
    return model
