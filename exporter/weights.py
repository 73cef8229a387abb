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
from .model import MoE, Linear, Transformer


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


def load_weights(model: Transformer, source) -> Transformer:
    """Copy every parameter of the model from the source; FP8 weights stay FP8 (with their scales)."""
    cfg = model.cfg
    for i, layer in enumerate(list(model.layers) + [m.block for m in model.mtp]):
        _load_block(layer, f"layers.{i}", source, model.dtype)
    model.embed.weight.copy_(source.get("embed.weight"))
    model.norm.weight.copy_(source.get("norm.weight"))
    _load_linear(model.head, "head.weight", source)
    for m, mtp in enumerate(model.mtp):
        p = f"layers.{cfg.n_layers + m}"
        for part in ("enorm", "hnorm"):
            getattr(mtp, part).weight.copy_(source.get(f"{p}.{part}.weight"))
        _load_linear(mtp.eh_proj, f"{p}.eh_proj.weight", source)
        mtp.norm.weight.copy_(source.get(f"{p}.shared_head.norm.weight"))
        head = f"{p}.shared_head.head.weight"
        _load_linear(mtp.head, head if head in source else "head.weight", source)
    return model


def _load_linear(linear: Linear, name: str, source) -> None:
    w = source.get(name)
    if source.is_fp8(name):
        linear.set_fp8(w, source.get(name[: -len("weight")] + "scale"), source.block)
    else:
        linear.weight.copy_(w)


def _load_block(block, p: str, source, dtype: torch.dtype) -> None:
    block.attn_norm.weight.copy_(source.get(f"{p}.attn_norm.weight"))
    block.ffn_norm.weight.copy_(source.get(f"{p}.ffn_norm.weight"))
    attn = block.attn
    for part in ("wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo"):
        if hasattr(attn, part):
            _load_linear(getattr(attn, part), f"{p}.attn.{part}.weight", source)
    for part in ("q_norm", "kv_norm"):
        if hasattr(attn, part):
            getattr(attn, part).weight.copy_(source.get(f"{p}.attn.{part}.weight"))
    ffn = block.ffn
    if not isinstance(ffn, MoE):
        for part in ("w1", "w2", "w3"):
            _load_linear(getattr(ffn, part), f"{p}.ffn.{part}.weight", source)
        return
    ffn.gate.weight.copy_(source.get(f"{p}.ffn.gate.weight"))
    if ffn.gate.bias is not None:
        if f"{p}.ffn.gate.bias" not in source:
            raise CheckpointError(f"tensor '{p}.ffn.gate.bias' missing")
        ffn.gate.bias.copy_(source.get(f"{p}.ffn.gate.bias"))
    if ffn.shared_experts is not None:
        for part in ("w1", "w2", "w3"):
            _load_linear(getattr(ffn.shared_experts, part), f"{p}.ffn.shared_experts.{part}.weight", source)
    _load_experts(ffn, p, source, dtype)


def _dense(source, name: str, dtype: torch.dtype) -> torch.Tensor:
    w = source.get(name)
    if source.is_fp8(name):
        return dequantize_blocks(w, source.get(name[: -len("weight")] + "scale"), source.block, dtype)
    return w.to(dtype)


def _load_experts(ffn: MoE, p: str, source, dtype: torch.dtype) -> None:
    """Stack per-expert w1|w3 into w_gate_up [E,2I,D] and w2 into w_down [E,D,I].

    FP8 experts are dequantized here: the reference is the oracle, and the stacked FP8 form is the
    exporter's business."""
    for e in range(ffn.w_gate_up.shape[0]):
        name = f"{p}.ffn.experts.{e}"
        ffn.w_gate_up[e].copy_(torch.cat([_dense(source, f"{name}.w1.weight", dtype),
                                          _dense(source, f"{name}.w3.weight", dtype)]))
        ffn.w_down[e].copy_(_dense(source, f"{name}.w2.weight", dtype))
