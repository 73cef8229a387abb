"""Tensor names: our canonical names are DeepSeek's (`inference/convert.py` output), e.g.
`layers.3.attn.wkv_b.weight`, `layers.3.ffn.experts.7.w1.weight`, `layers.3.ffn.gate.bias`.
Hugging Face names map to them component by component; the shapes each name must have follow
from the config.
"""

from __future__ import annotations

import re

from dsv3_export.core.config import ModelConfig

# HF path component -> DeepSeek component. Components, not substrings: `gate` (router) must not
# match inside `gate_proj`.
_HF_TO_DS = {
    "embed_tokens": "embed",
    "lm_head": "head",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn": "attn",
    "q_proj": "wq",
    "q_a_proj": "wq_a",
    "q_a_layernorm": "q_norm",
    "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a",
    "kv_a_layernorm": "kv_norm",
    "kv_b_proj": "wkv_b",
    "o_proj": "wo",
    "mlp": "ffn",
    "gate_proj": "w1",
    "down_proj": "w2",
    "up_proj": "w3",
    "e_score_correction_bias": "bias",
    "weight_scale_inv": "scale",
}
_DS_TO_HF = {v: k for k, v in _HF_TO_DS.items()}


def from_hf(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "model":
        parts = parts[1:]
    return ".".join(_HF_TO_DS.get(p, p) for p in parts)


def to_hf(name: str) -> str:
    if name == "head.weight":
        return "lm_head.weight"
    # `head` stays `head` inside the MTP block's shared_head.
    return "model." + ".".join(p if p == "head" else _DS_TO_HF.get(p, p) for p in name.split("."))


# DeepSeek's model-parallel layout: which dim each weight is split along (None = replicated).
MP_SHARD_DIM = {"embed": 0, "head": 0, "wq": 0, "wq_b": 0, "wkv_b": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0}
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def expert_index(name: str) -> int | None:
    m = _EXPERT.search(name)
    return int(m.group(1)) if m and ".shared_experts." not in name else None


def mp_shard_dim(name: str) -> int | None:
    if expert_index(name) is not None:
        return None
    parts = name.split(".")
    return MP_SHARD_DIM.get(parts[-2]) if len(parts) >= 2 else None


def _mlp(prefix: str, dim: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.w1.weight": (inter, dim), f"{prefix}.w2.weight": (dim, inter), f"{prefix}.w3.weight": (inter, dim)}


def layer_shapes(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of decoder block i (i == n_layers + m is MTP block m), bias of the router included."""
    d, h, p = cfg.dim, cfg.n_heads, f"layers.{i}"
    s: dict[str, tuple[int, ...]] = {f"{p}.attn_norm.weight": (d,), f"{p}.ffn_norm.weight": (d,)}
    if cfg.q_lora_rank:
        s[f"{p}.attn.wq_a.weight"] = (cfg.q_lora_rank, d)
        s[f"{p}.attn.q_norm.weight"] = (cfg.q_lora_rank,)
        s[f"{p}.attn.wq_b.weight"] = (h * cfg.qk_head_dim, cfg.q_lora_rank)
    else:
        s[f"{p}.attn.wq.weight"] = (h * cfg.qk_head_dim, d)
    s[f"{p}.attn.wkv_a.weight"] = (cfg.latent_dim, d)
    s[f"{p}.attn.kv_norm.weight"] = (cfg.kv_lora_rank,)
    s[f"{p}.attn.wkv_b.weight"] = (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    s[f"{p}.attn.wo.weight"] = (d, h * cfg.v_head_dim)
    if cfg.is_moe_layer(i):
        s[f"{p}.ffn.gate.weight"] = (cfg.n_routed_experts, d)
        s[f"{p}.ffn.gate.bias"] = (cfg.n_routed_experts,)
        for e in range(cfg.n_routed_experts):
            s.update(_mlp(f"{p}.ffn.experts.{e}", d, cfg.moe_inter_dim))
        if cfg.n_shared_experts:
            s.update(_mlp(f"{p}.ffn.shared_experts", d, cfg.n_shared_experts * cfg.moe_inter_dim))
    else:
        s.update(_mlp(f"{p}.ffn", d, cfg.inter_dim))
    if i >= cfg.n_layers:  # MTP block extras
        s[f"{p}.enorm.weight"] = (d,)
        s[f"{p}.hnorm.weight"] = (d,)
        s[f"{p}.eh_proj.weight"] = (d, 2 * d)
        s[f"{p}.embed.weight"] = (cfg.vocab_size, d)
        s[f"{p}.shared_head.norm.weight"] = (d,)
        s[f"{p}.shared_head.head.weight"] = (cfg.vocab_size, d)
    return s


def expected_shapes(cfg: ModelConfig, mtp: bool = True) -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {"embed.weight": (cfg.vocab_size, cfg.dim), "norm.weight": (cfg.dim,),
                                     "head.weight": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers + (cfg.n_mtp_layers if mtp else 0)):
        s.update(layer_shapes(cfg, i))
    return s


def optional(name: str) -> bool:
    """Tensors a valid checkpoint may lack: the router bias (V2 has none), MTP copies of embed/head."""
    return name.endswith(".gate.bias") or name.endswith(".embed.weight") and name != "embed.weight" \
        or name.endswith("shared_head.head.weight")


def is_quantizable(name: str) -> bool:
    """Weights DeepSeek stores in FP8: the attention and FFN projections, not the router or embeddings."""
    return name.endswith(".weight") and (".attn.w" in name or re.search(r"\.ffn\.(experts\.\d+\.|shared_experts\.)?w[123]\.", name) is not None)
