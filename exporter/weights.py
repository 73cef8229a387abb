"""Filling the reference model from a weight source, one tensor at a time.

A weight source is a `Checkpoint` or `RandomWeights` (seeded, for presets): both answer
`config`, `get(name)`, `name in source`, `is_fp8(name)`, `block` and `has_mtp`.
"""

from __future__ import annotations

import hashlib
import math

import torch

from . import names
from .checkpoint import dequantize_blocks, quantize_blocks
from .config import ModelConfig
from .errors import CheckpointError
from .model import Linear, Transformer, rope_inv_freq


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


def source_tensor(source, fqn: str, dtype: torch.dtype, keep_fp8: bool = False):
    """The value of the model parameter `fqn` (its name in `Transformer`), made from the source's
    canonical tensors: W_UK / W_UV cut from wkv_b, experts stacked, FP8 dequantized (or, with
    keep_fp8, returned as (fp8 weight, scale)). The one mapping the reference loader and the ONNX
    weight attachment share."""
    cfg = source.config
    if fqn == "inv_freq":
        return rope_inv_freq(cfg)
    parts = fqn.split(".")
    if parts[0] == "layers":
        return _block_tensor(source, f"layers.{parts[1]}", ".".join(parts[2:]), dtype, keep_fp8)
    if parts[0] == "mtp":
        p, rest = f"layers.{cfg.n_layers + int(parts[1])}", ".".join(parts[2:])
        if rest.startswith("block."):
            return _block_tensor(source, p, rest[len("block."):], dtype, keep_fp8)
        head = f"{p}.shared_head.head.weight"
        name = {"norm.weight": f"{p}.shared_head.norm.weight",
                "head.weight": head if head in source else "head.weight"}.get(rest, f"{p}.{rest}")
        return _tensor(source, name, dtype, keep_fp8)
    return _tensor(source, fqn, dtype, keep_fp8)


def _block_tensor(source, p: str, rest: str, dtype: torch.dtype, keep_fp8: bool):
    cfg = source.config
    if rest in ("attn.w_uk", "attn.w_uv"):
        dn = cfg.qk_nope_head_dim
        w = _dense(source, f"{p}.attn.wkv_b.weight", dtype).view(cfg.n_heads, dn + cfg.v_head_dim, cfg.kv_lora_rank)
        return (w[:, :dn] if rest == "attn.w_uk" else w[:, dn:]).contiguous()
    if rest in ("ffn.w_gate_up", "ffn.w_down"):
        # The largest tensors of the model: filled in place, so the peak is one stack, not two.
        parts = ("w1", "w3") if rest == "ffn.w_gate_up" else ("w2",)
        stack = None
        for e in range(cfg.n_routed_experts):
            rows = [_dense(source, f"{p}.ffn.experts.{e}.{w}.weight", dtype) for w in parts]
            if stack is None:
                stack = torch.empty(cfg.n_routed_experts, sum(r.shape[0] for r in rows), rows[0].shape[1], dtype=dtype)
            torch.cat(rows, out=stack[e])  # [2I, D] gate rows then up rows, or [D, I]
        return stack
    return _tensor(source, f"{p}.{rest}", dtype, keep_fp8)


def _tensor(source, name: str, dtype: torch.dtype, keep_fp8: bool):
    if name not in source:
        raise CheckpointError(f"tensor {name!r} missing")
    if keep_fp8 and source.is_fp8(name):
        return source.get(name), source.get(name[: -len("weight")] + "scale")
    return _dense(source, name, dtype)


def _dense(source, name: str, dtype: torch.dtype) -> torch.Tensor:
    w = source.get(name)
    if source.is_fp8(name):
        return dequantize_blocks(w, source.get(name[: -len("weight")] + "scale"), source.block, dtype)
    return w.to(dtype)


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
