"""Filling the reference model from a weight source, one tensor at a time.

A weight source is a `Checkpoint` or `RandomWeights` (seeded, for presets): both answer
`config`, `get(name)`, `name in source`, `is_fp8(name)`, `block` and `has_mtp`.
"""

from __future__ import annotations

import hashlib
import math

import torch

import dsv3_export.exporter.names as names
from dsv3_export.core.config import ModelConfig
from dsv3_export.core.errors import CheckpointError
from dsv3_export.core.fp8 import FP8_BLOCK, FP8_DTYPE, dequantize_blocks, quantize_blocks
from dsv3_export.exporter.checkpoint import check_finite
from dsv3_export.exporter.model import Linear, Transformer, rope_inv_freq


class RandomWeights:
    """Seeded random weights in canonical names. Each tensor has its own generator seeded from
    (seed, name), so any tensor can be made alone, in any order, identically."""

    def __init__(self, config: ModelConfig, seed: int = 0, fp8: bool | None = None):
        self.config = config
        self.seed = seed
        self.fp8 = config.weight_dtype == "fp8" if fp8 is None else fp8
        self.shapes = names.expected_shapes(config)
        self.block = config.fp8_block or (128, 128)
        self.has_mtp = config.n_mtp_layers > 0

    def _generator(self, name: str) -> torch.Generator:
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))

    def dense(self, name: str) -> torch.Tensor:
        """The fp32 value of a tensor (before any FP8 quantization)."""
        shape = self.shapes[name]
        g = self._generator(name)
        if len(shape) == 1:
            if name.endswith(".bias"):  # correction bias: selection only, of the scores' order
                return 0.05 * torch.randn(shape, generator=g)
            return 1.0 + 0.1 * torch.randn(shape, generator=g)  # norms around 1, not exactly 1
        if name.endswith("embed.weight"):
            return torch.randn(shape, generator=g)
        std = 1.0 / math.sqrt(shape[1])
        if name.endswith("head.weight"):
            std *= 4.0  # so logits are not flat
        elif name.endswith(".gate.weight"):
            std *= 2.0  # routing decisions with margins
        return std * torch.randn(shape, generator=g)

    def names(self) -> list[str]:
        out = []
        for name in self.shapes:
            out.append(name)
            if self.is_fp8(name):
                out.append(name[: -len("weight")] + "scale")
        return out

    def __contains__(self, name: str) -> bool:
        if name.endswith(".scale"):
            return self.is_fp8(name[: -len("scale")] + "weight")
        return name in self.shapes

    def is_fp8(self, name: str) -> bool:
        return self.fp8 and names.is_quantizable(name)

    def get(self, name: str) -> torch.Tensor:
        if name.endswith(".scale"):
            return quantize_blocks(self.dense(name[: -len("scale")] + "weight"), self.block)[1]
        w = self.dense(name)
        if self.is_fp8(name):
            return quantize_blocks(w, self.block)[0]
        return w


def resolve(source, fqn: str) -> tuple[str, str]:
    """Where a model parameter comes from: (checkpoint layer prefix "layers.N", rest) for a decoder
    block's parameter (MTP blocks included), ("", checkpoint name) for any other."""
    cfg = source.config
    parts = fqn.split(".")
    if parts[0] == "layers":
        return f"layers.{parts[1]}", ".".join(parts[2:])
    if parts[0] == "mtp":
        p, rest = f"layers.{cfg.n_layers + int(parts[1])}", ".".join(parts[2:])
        if rest.startswith("block."):
            return p, rest[len("block."):]
        head = f"{p}.shared_head.head.weight"
        return "", {"norm.weight": f"{p}.shared_head.norm.weight",
                    "head.weight": head if head in source else "head.weight"}.get(rest, f"{p}.{rest}")
    return "", fqn


def source_tensor(source, fqn: str, dtype: torch.dtype, keep_fp8: bool = False):
    """The value of the model parameter `fqn` (its name in `Transformer`), made from the source's
    canonical tensors: W_UK / W_UV cut from wkv_b, experts stacked, FP8 dequantized (or, with
    keep_fp8, returned as (fp8 weight, scale)). The one mapping the reference loader and the ONNX
    weight attachment share."""
    if fqn == "inv_freq":
        return rope_inv_freq(source.config)
    prefix, rest = resolve(source, fqn)
    if prefix:
        return _block_tensor(source, prefix, rest, dtype, keep_fp8)
    return _tensor(source, rest, dtype, keep_fp8)


def source_fp8(source, fqn: str):
    """A matmul weight of the graph in DeepSeek's FP8 form, through the same mapping: the stored
    E4M3 bytes and scales when the checkpoint has them (bit for bit), else `quantize_blocks` of the
    dense weight. Returns (q, scale):

    - a Linear weight [out, in]: scale per row and 128-column block, [out, ceil(in/128)] (the
      128x128 block scale repeated along the output axis);
    - attn.w_uk / attn.w_uv [H, d, r], cut from wkv_b: row scales [H, d, ceil(r/128)] (a head's rows
      need not start on a block);
    - ffn.w_gate_up [E, 2*Ip, D] / ffn.w_down [E, D, Ip]: 128x128 block scales [E, 2*Ip/128,
      ceil(D/128)] / [E, ceil(D/128), Ip/128], the inner dim I zero-padded to Ip = a multiple of 128
      so that gate and up rows each start on a block (exact: padded rows and columns are 0).
    """
    cfg = source.config
    prefix, rest = resolve(source, fqn)
    if prefix and rest in ("attn.w_uk", "attn.w_uv"):
        q, scale = _fp8(source, f"{prefix}.attn.wkv_b.weight")
        dn, dv = cfg.qk_nope_head_dim, cfg.v_head_dim
        rows = _row_scales(scale, q.shape[0]).view(cfg.n_heads, dn + dv, -1)
        q = q.view(cfg.n_heads, dn + dv, cfg.kv_lora_rank)
        part = slice(0, dn) if rest == "attn.w_uk" else slice(dn, dn + dv)
        return q[:, part].contiguous(), rows[:, part].contiguous()
    if prefix and rest in ("ffn.w_gate_up", "ffn.w_down"):
        return _fp8_experts(source, prefix, rest)
    q, scale = _fp8(source, f"{prefix}.{rest}" if prefix else rest)
    return q, _row_scales(scale, q.shape[0])


def _row_scales(scale: torch.Tensor, rows: int) -> torch.Tensor:
    return scale.repeat_interleave(FP8_BLOCK, 0)[:rows].contiguous()


def _fp8(source, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name not in source:
        raise CheckpointError(f"tensor {name!r} missing")
    if source.is_fp8(name):
        if tuple(source.block) != (FP8_BLOCK, FP8_BLOCK):
            raise CheckpointError(f"{name}: FP8 blocks of {source.block[0]}x{source.block[1]}; --precision fp8 "
                                  f"keeps DeepSeek's {FP8_BLOCK}x{FP8_BLOCK} blocks only (build fp32 or int8 instead)")
        return source.get(name), source.get(name[: -len("weight")] + "scale").float()
    return quantize_blocks(source.get(name).float(), (FP8_BLOCK, FP8_BLOCK))


def _fp8_experts(source, p: str, rest: str) -> tuple[torch.Tensor, torch.Tensor]:
    n_e = source.config.n_routed_experts
    q0, s0 = expert_fp8(source, p, rest, 0)
    q = torch.empty(n_e, *q0.shape, dtype=torch.uint8).view(FP8_DTYPE)
    scale = torch.empty(n_e, *s0.shape)
    q[0], scale[0] = q0, s0
    for e in range(1, n_e):  # filled in place: the peak is the stack, not the stack and its parts
        q[e], scale[e] = expert_fp8(source, p, rest, e)
    return q, scale


def is_expert_stack(fqn: str) -> bool:
    """A routed-expert stack parameter ([E, ...]): made, quantized and written one expert at a time."""
    return fqn.endswith(("ffn.w_gate_up", "ffn.w_down"))


def expert_of(source, fqn: str) -> tuple[str, str]:
    """(checkpoint layer prefix, "ffn.w_gate_up" | "ffn.w_down") of an expert stack parameter."""
    prefix, rest = resolve(source, fqn)
    if not prefix or rest not in ("ffn.w_gate_up", "ffn.w_down"):
        raise CheckpointError(f"{fqn!r} is not a routed-expert stack")
    return prefix, rest


def expert_fp8(source, p: str, rest: str, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e of source_fp8's stack: (q [2Ip, D] or [D, Ip], 128x128 block scales)."""
    cfg = source.config
    inter, d = cfg.moe_inter_dim, cfg.dim
    padded = -(-inter // FP8_BLOCK) * FP8_BLOCK
    nb_i, nb_d = padded // FP8_BLOCK, -(-d // FP8_BLOCK)
    if rest == "ffn.w_gate_up":
        q = torch.zeros(2 * padded, d, dtype=torch.uint8).view(FP8_DTYPE)
        scale = torch.zeros(2 * nb_i, nb_d)
        for j, w in enumerate(("w1", "w3")):  # gate rows, then up rows, each from a block boundary
            qe, se = _fp8(source, f"{p}.ffn.experts.{e}.{w}.weight")
            q[j * padded: j * padded + inter] = qe
            scale[j * nb_i: j * nb_i + se.shape[0]] = se
    else:
        q = torch.zeros(d, padded, dtype=torch.uint8).view(FP8_DTYPE)
        scale = torch.zeros(nb_d, nb_i)
        qe, se = _fp8(source, f"{p}.ffn.experts.{e}.w2.weight")
        q[:, :inter] = qe
        scale[:, : se.shape[1]] = se
    _release(source)
    return q, scale


def expert_tensor(source, p: str, rest: str, e: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert e of the stack `rest` of layer `p`: [2I, D] (gate rows, then up rows) or [D, I]."""
    parts = ("w1", "w3") if rest == "ffn.w_gate_up" else ("w2",)
    rows = [_dense(source, f"{p}.ffn.experts.{e}.{w}.weight", dtype) for w in parts]
    _release(source)
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def _release(source) -> None:
    """Unmap the checkpoint's files after an expert: a stack streams through with one expert's pages."""
    if hasattr(source, "release"):
        source.release()


def _block_tensor(source, p: str, rest: str, dtype: torch.dtype, keep_fp8: bool):
    cfg = source.config
    if rest in ("attn.w_uk", "attn.w_uv"):
        dn = cfg.qk_nope_head_dim
        w = _dense(source, f"{p}.attn.wkv_b.weight", dtype).view(cfg.n_heads, dn + cfg.v_head_dim, cfg.kv_lora_rank)
        return (w[:, :dn] if rest == "attn.w_uk" else w[:, dn:]).contiguous()
    if rest in ("ffn.w_gate_up", "ffn.w_down"):
        # Filled in place, so the peak is one stack, not two. The build never asks for a whole
        # stack (it writes expert by expert, exporter/expert_stack.py); the full reference does.
        first = expert_tensor(source, p, rest, 0, dtype)
        stack = torch.empty(cfg.n_routed_experts, *first.shape, dtype=dtype)
        stack[0] = first
        for e in range(1, cfg.n_routed_experts):
            stack[e] = expert_tensor(source, p, rest, e, dtype)
        return stack
    return _tensor(source, f"{p}.{rest}", dtype, keep_fp8)


def _tensor(source, name: str, dtype: torch.dtype, keep_fp8: bool):
    if name not in source:
        raise CheckpointError(f"tensor {name!r} missing")
    if keep_fp8 and source.is_fp8(name):
        return source.get(name), source.get(name[: -len("weight")] + "scale")
    return _dense(source, name, dtype)


def _dense(source, name: str, dtype: torch.dtype) -> torch.Tensor:
    w = source.get(name)  # a Checkpoint refuses NaN/Inf as it reads
    if source.is_fp8(name):
        w = dequantize_blocks(w, source.get(name[: -len("weight")] + "scale"), source.block, dtype)
        return check_finite(w, f"tensor {name!r} dequantized (weight x scale)")  # the product may overflow
    return check_finite(w.to(dtype), f"tensor {name!r} as {str(dtype).replace('torch.', '')}")


def load_weights(model: Transformer, source) -> Transformer:
    """Copy every parameter of the model from the source; FP8 linears stay FP8 (with their scales)."""
    modules = dict(model.named_modules())
    for fqn, param in list(model.named_parameters()):
        value = source_tensor(source, fqn, param.dtype, keep_fp8=fqn.endswith(".weight"))
        if isinstance(value, tuple):
            owner = modules[fqn.rsplit(".", 1)[0]]
            if not isinstance(owner, Linear):
                value = dequantize_blocks(*value, source.block, param.dtype)
            else:
                owner.set_fp8(*value, source.block)
                continue
        param.copy_(value)
    return model
