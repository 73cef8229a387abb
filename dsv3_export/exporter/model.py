"""The PyTorch reference of the DeepSeek-V3 architecture: the math, in one file.

Semantics follow DeepSeek's `inference/model.py`: MLA with optional q compression, YaRN RoPE on
interleaved pairs, dense-first SwiGLU then MoE with group-limited routing, shared experts, and the
MTP block. Attention runs naive (per-head K/V, cache [B,T,H,dn+dr+dv]) or absorbed (W_UK folded
into the query, W_UV into the output, cache the 576-wide latent [B,T,r+dr]); both are stateless:
`forward(input_ids, past) -> (logits, hidden_states, past)`, past the cached prefix of every row.
Absorbed MLA also runs over cache buffers (graph contract v2): `forward(input_ids, past,
cache_lengths)` with past [B,T,C] per layer holding cache_lengths[b] valid rows of row b, the new
rows written at their positions (CacheWrite), each row attending to its own keys only.

`Transformer.training_form()` selects, on one model instance, the differentiable form that
tools/train_demo.py trains: the same function of the same weights, off by default.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dsv3_export.core.config import ModelConfig
from dsv3_export.core.fp8 import FP8_DTYPE, dequantize_blocks
from dsv3_export.plugins.cache_write.op import cache_write, cache_write_op
from dsv3_export.plugins.latent_attention.reference import latent_attention, latent_attention_op
from dsv3_export.plugins.moe_dispatch.reference import moe_dispatch, moe_dispatch_op

MLA_MODES = ("absorbed", "naive")


class ModelOutput(NamedTuple):
    logits: torch.Tensor
    hidden_states: torch.Tensor
    past: list[torch.Tensor]


# ---- building blocks ----------------------------------------------------------------------------
class Linear(nn.Module):
    """y = x Wᵀ; W may be FP8 with a per-block multiplier, dequantized on the fly."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.register_buffer("scale", None)
        self.block = (128, 128)
        self.act_quant = None  # x -> x quantized and back: the emulation of a quantized graph (exporter/quant.py)

    def set_fp8(self, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> None:
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = scale.float()
        self.block = block

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.weight.dtype == FP8_DTYPE:
            return dequantize_blocks(self.weight, self.scale, self.block, dtype)
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        return F.linear(x, self.dense_weight(x.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(acc)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(acc) * xf).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair rotation frequencies, YaRN-corrected when the context exceeds the pretraining one."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if cfg.yarn_active:
        def correction_dim(rotations: float) -> float:
            return dim * math.log(cfg.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
        high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / cfg.rope_factor * (1 - smooth) + freqs * smooth
    return freqs


def rope_angles(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of position × frequency: positions [S] -> [S, dr/2], or per row [B,S] -> [B,S,dr/2];
    float32 like the references (float64 if asked)."""
    acc = torch.promote_types(dtype, torch.float32)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos().to(acc), angles.sin().to(acc)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by angle i; x [B,S,H,dr], cos/sin [S,dr/2] or [B,S,dr/2]."""
    acc = cos.dtype
    pairs = x.to(acc).unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = (cos[None, :, None, :], sin[None, :, None, :]) if cos.dim() == 2 else (cos[:, :, None], sin[:, :, None])
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).to(x.dtype)


def causal_mask(s_len: int, t_len: int, device: torch.device) -> torch.Tensor:
    """[S,T] bool: query s (position T-S+s) sees keys 0 … T-S+s."""
    return torch.arange(t_len, device=device)[None, :] <= torch.arange(s_len, device=device)[:, None] + (t_len - s_len)


# ---- attention ----------------------------------------------------------------------------------
class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, mla: str):
        super().__init__()
        self.cfg, self.mla = cfg, mla
        d, h = cfg.dim, cfg.n_heads
        if cfg.q_lora_rank:
            self.wq_a = Linear(d, cfg.q_lora_rank, dtype)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps, dtype)
            self.wq_b = Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, dtype)
        else:
            self.wq = Linear(d, h * cfg.qk_head_dim, dtype)
        self.wkv_a = Linear(d, cfg.latent_dim, dtype)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps, dtype)
        if mla == "absorbed":
            # wkv_b split per head: W_UK folds into the query, W_UV into the output.
            self.w_uk = nn.Parameter(torch.empty(h, cfg.qk_nope_head_dim, cfg.kv_lora_rank, dtype=dtype), requires_grad=False)
            self.w_uv = nn.Parameter(torch.empty(h, cfg.v_head_dim, cfg.kv_lora_rank, dtype=dtype), requires_grad=False)
        else:
            self.wkv_b = Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), dtype)
        self.wo = Linear(h * cfg.v_head_dim, d, dtype)
        # The training hook (Transformer.training_form): the custom ops have no autograd formula, so
        # training needs their plain-torch references, and naive MLA without a cache trains faster
        # through torch's fused attention. Set per instance, never by patching this module.
        self.training_form = False

    def query(self, x: torch.Tensor) -> torch.Tensor:
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.cfg.q_lora_rank else self.wq(x)
        return q.unflatten(-1, (self.cfg.n_heads, self.cfg.qk_head_dim))

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(q_nope [B,S,H,dn], q_pe [B,S,H,dr] rotated, c_kv [B,S,r] normed, k_pe [B,S,dr] rotated):
        what every form of the attention starts from."""
        cfg = self.cfg
        q_nope, q_pe = self.query(x).split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = self.wkv_a(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        return (q_nope, apply_rope(q_pe, cos, sin), self.kv_norm(c_kv),
                apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: torch.Tensor | None,
                cache_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """past: the cached prefix [B,T,...] (None: empty), or with cache_lengths [B] (absorbed only)
        the cache buffer [B,T,C] of which row b holds cache_lengths[b] rows. Returns (output, cache):
        the prefix grown by the new rows, or the buffer with them written."""
        cfg = self.cfg
        dn, dr, dv, r, h = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.n_heads
        q_nope, q_pe, c_kv, k_pe = self.project(x, cos, sin)
        if self.training_form and self.mla == "naive" and past is None:
            return self.fused_attention(q_nope, q_pe, c_kv, k_pe), None
        if self.mla == "absorbed":
            new = torch.cat([c_kv, k_pe], dim=-1)
            if cache_lengths is not None:
                write = cache_write if self.training_form else cache_write_op
                latent = write(past, new, cache_lengths)
            else:  # the prefix form: every row's new tokens follow its T - S cached ones
                latent = new if past is None else torch.cat([past, new], dim=1)
                cache_lengths = torch.full((x.shape[0],), latent.shape[1] - x.shape[1], dtype=torch.int64,
                                           device=x.device)
            q_lat = torch.einsum("bshd,hdc->bshc", q_nope, self.w_uk)
            q = torch.cat([q_lat, q_pe], dim=-1)
            if self.training_form:
                o_lat = latent_attention(q, latent, cfg.softmax_scale, r, cache_lengths)
            else:
                o_lat = latent_attention_op(q, latent, cache_lengths, cfg.softmax_scale, r)
            out = torch.einsum("bshc,hdc->bshd", o_lat, self.w_uv)
            return self.wo(out.flatten(2)), latent
        if cache_lengths is not None:
            raise ValueError("cache buffers (cache_lengths) need absorbed MLA; naive MLA caches prefixes only")

        # naive: expand the latent to per-head K and V and cache those.
        w_kv = self.wkv_b.dense_weight(x.dtype).view(h, dn + dv, r)
        kv = torch.einsum("btc,hdc->bthd", c_kv, w_kv)
        k_nope, v = kv.split([dn, dv], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, h, -1)], dim=-1)
        cache = torch.cat([k, v], dim=-1)
        if past is not None:
            cache = torch.cat([past, cache], dim=1)
        k, v = cache.split([dn + dr, dv], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        acc = torch.promote_types(x.dtype, torch.float32)
        scores = torch.einsum("bshd,bthd->bsht", q.to(acc), k.to(acc)) * cfg.softmax_scale
        mask = causal_mask(q.shape[1], k.shape[1], x.device)
        scores = scores.masked_fill(~mask[None, :, None, :], float("-inf"))
        out = torch.einsum("bsht,bthd->bshd", scores.softmax(dim=-1), v.to(acc)).to(x.dtype)
        return self.wo(out.flatten(2)), cache

    def fused_attention(self, q_nope, q_pe, c_kv, k_pe) -> torch.Tensor:
        """Naive MLA without a cache through torch's scaled_dot_product_attention (the training form):
        V zero-padded to the QK width so the flash kernel applies; the padding adds nothing."""
        cfg = self.cfg
        dn, dr, dv, h = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.n_heads
        k_nope, v = self.wkv_b(c_kv).unflatten(-1, (h, dn + dv)).split([dn, dv], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, h, -1)], dim=-1)
        width = max(dn + dr, dv)
        q, k, v = (F.pad(t, (0, width - t.shape[-1])).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=cfg.softmax_scale)[..., :dv]
        return self.wo(o.transpose(1, 2).flatten(2))


# ---- feed-forward -------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, dim: int, inter: int, dtype: torch.dtype):
        super().__init__()
        self.w1, self.w2, self.w3 = Linear(dim, inter, dtype), Linear(inter, dim, dtype), Linear(dim, inter, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """Router: scores, optional correction bias (selection only), group limit, top-k, weights."""

    def __init__(self, cfg: ModelConfig, has_bias: bool):
        super().__init__()
        self.cfg = cfg
        # The router stays fp32 whatever the model dtype (as checkpoints and transformers keep it).
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts), requires_grad=False) if has_bias else None
        self.act_quant = None  # as Linear's

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        acc = torch.promote_types(x.dtype, torch.float32)
        xin = x if self.act_quant is None else self.act_quant(x)
        logits = F.linear(xin.to(acc), self.weight.to(acc))
        scores = logits.softmax(dim=-1) if cfg.score_func == "softmax" else logits.sigmoid()
        original = scores
        if self.bias is not None:
            scores = scores + self.bias.to(acc)
        if cfg.n_expert_groups > 1:
            grouped = scores.unflatten(-1, (cfg.n_expert_groups, -1))
            group_scores = grouped.amax(-1) if self.bias is None else grouped.topk(2, dim=-1)[0].sum(-1)
            keep = group_scores.topk(cfg.n_limited_groups, dim=-1)[1]
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter(-1, keep, False)
            # -inf (DeepSeek): a dropped group can never win, even against negative biased scores.
            scores = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(-2)
        idx = scores.topk(cfg.n_activated_experts, dim=-1)[1]
        weights = original.gather(-1, idx)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return (weights * cfg.route_scale).to(x.dtype), idx


class MoE(nn.Module):
    """Routed experts stacked as MoEDispatch takes them, plus the shared experts."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, has_bias: bool):
        super().__init__()
        e, d, i = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        self.gate = Gate(cfg, has_bias)
        self.w_gate_up = nn.Parameter(torch.empty(e, 2 * i, d, dtype=dtype), requires_grad=False)
        self.w_down = nn.Parameter(torch.empty(e, d, i, dtype=dtype), requires_grad=False)
        self.shared_experts = MLP(d, cfg.n_shared_experts * i, dtype) if cfg.n_shared_experts else None
        self.act_quant = None  # on the routed experts' input only, like the quantized graph
        self.training_form = False  # the plain-torch dispatch, which autograd differentiates (see MLA's)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(0, -2)
        weights, idx = self.gate(flat)
        xe = flat if self.act_quant is None else self.act_quant(flat)
        dispatch = moe_dispatch if self.training_form else moe_dispatch_op
        y = dispatch(xe, idx, weights, self.w_gate_up.to(x.dtype), self.w_down.to(x.dtype))
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view_as(x)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, mla: str, has_bias: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.attn = MLA(cfg, dtype, mla)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.ffn = MoE(cfg, dtype, has_bias) if cfg.is_moe_layer(layer) else MLP(cfg.dim, cfg.inter_dim, dtype)

    def forward(self, x, cos, sin, past, cache_lengths=None):
        a, cache = self.attn(self.attn_norm(x), cos, sin, past, cache_lengths)
        x = x + a
        return x + self.ffn(self.ffn_norm(x)), cache


class MTPBlock(nn.Module):
    """Predicts token i+2 from the main model's final-normed h_i and the embedding of token i+1."""

    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, mla: str, has_bias: bool):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.eh_proj = Linear(2 * cfg.dim, cfg.dim, dtype)
        self.block = Block(cfg, layer, dtype, mla, has_bias)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)  # shared_head.norm
        self.head = Linear(cfg.dim, cfg.vocab_size, dtype)  # shared_head.head

    def forward(self, emb, hidden, cos, sin, past, cache_lengths=None):
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1))
        x, cache = self.block(x, cos, sin, past, cache_lengths)
        return self.head(self.norm(x)), cache


# ---- the model ----------------------------------------------------------------------------------
class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: torch.dtype = torch.float32, mla: str = "absorbed",
                 has_gate_bias: bool | None = None, mtp: bool | None = None):
        super().__init__()
        if mla not in MLA_MODES:
            raise ValueError(f"mla must be one of {MLA_MODES}, got {mla!r}")
        self.cfg, self.dtype, self.mla = cfg, dtype, mla
        has_bias = cfg.score_func == "sigmoid" if has_gate_bias is None else has_gate_bias
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim, dtype=dtype)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(cfg, i, dtype, mla, has_bias) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.head = Linear(cfg.dim, cfg.vocab_size, dtype)
        n_mtp = cfg.n_mtp_layers if mtp is None else (cfg.n_mtp_layers if mtp else 0)
        self.mtp = nn.ModuleList(MTPBlock(cfg, cfg.n_layers + m, dtype, mla, has_bias) for m in range(n_mtp))
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def _angles(self, past, seq_len: int, device, cache_lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE angles of the new positions: after the cached prefix, or per row after its cache length."""
        positions = torch.arange(seq_len, device=device)
        if cache_lengths is not None:
            positions = cache_lengths.to(torch.int64)[:, None] + positions[None, :]
        elif past is not None:
            positions = positions + past.shape[1]
        return rope_angles(self.inv_freq, positions, self.dtype)

    @contextlib.contextmanager
    def training_form(self, enabled: bool = True) -> Iterator[Transformer]:
        """Within: this model (and only it) runs its training form, differentiable and faster to train:
        the custom ops' plain-torch references, and naive MLA without a cache through fused attention.
        The same function of the same weights; on exit each module's previous form is restored."""
        modules = [m for m in self.modules() if isinstance(m, (MLA, MoE))]
        saved = [m.training_form for m in modules]
        for m in modules:
            m.training_form = enabled
        try:
            yield self
        finally:
            for m, s in zip(modules, saved):
                m.training_form = s

    def forward(self, input_ids: torch.Tensor, past: list[torch.Tensor] | None = None,
                cache_lengths: torch.Tensor | None = None) -> ModelOutput:
        """past: per layer the cached prefix, or with cache_lengths [B] the cache buffer (MLA.forward)."""
        cos, sin = self._angles(past[0] if past else None, input_ids.shape[1], input_ids.device, cache_lengths)
        x = self.embed(input_ids)
        new_past = []
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, cos, sin, past[i] if past else None, cache_lengths)
            new_past.append(cache)
        hidden = self.norm(x)
        return ModelOutput(self.head(hidden), hidden, new_past)

    def mtp_forward(self, input_ids: torch.Tensor, hidden_states: torch.Tensor, past: torch.Tensor | None = None,
                    depth: int = 0, cache_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP draft logits for token i+2, given tokens i+1 and the main model's h_i (position i)."""
        if not len(self.mtp):
            raise ValueError("this model has no MTP layer")
        cos, sin = self._angles(past, input_ids.shape[1], input_ids.device, cache_lengths)
        return self.mtp[depth](self.embed(input_ids), hidden_states, cos, sin, past, cache_lengths)

    def generate_greedy(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation with the cache (tests and the verify oracle)."""
        out = self(input_ids)
        tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(max_new_tokens - 1):
            out = self(tokens[-1], out.past)
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        return torch.cat(tokens, dim=1)
