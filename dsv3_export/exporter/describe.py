"""What a checkpoint is: its shape, parameter counts, and what its KV cache costs."""

from __future__ import annotations

import math
from typing import Any

import dsv3_export.exporter.names as names
from dsv3_export.core.config import ModelConfig

CACHE_DTYPE_BYTES = 2  # bf16 cache, as served


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total and activated-per-token parameters, main model and MTP apart (DeepSeek's 671B / 37B)."""
    main = names.expected_shapes(cfg, mtp=False)
    total = sum(math.prod(s) for s in main.values())
    expert = 3 * cfg.dim * cfg.moe_inter_dim
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    inactive = moe_layers * (cfg.n_routed_experts - cfg.n_activated_experts) * expert
    # The input embedding is a lookup, not compute: DeepSeek's activated count leaves it out.
    activated = total - inactive - cfg.vocab_size * cfg.dim
    mtp = sum(math.prod(s) for n, s in names.expected_shapes(cfg).items() if n not in main
              and not n.endswith((".embed.weight", "shared_head.head.weight")))  # those are shared copies
    return {"total": total, "activated": activated, "mtp": mtp if cfg.n_mtp_layers else 0}


def cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = CACHE_DTYPE_BYTES) -> dict[str, int]:
    return {"latent": cfg.n_layers * cfg.latent_dim * dtype_bytes,
            "naive": cfg.n_layers * cfg.naive_cache_dim * dtype_bytes}


def describe(source) -> dict[str, Any]:
    cfg: ModelConfig = source.config
    counts = parameter_counts(cfg)
    cache = cache_bytes_per_token(cfg)
    stored = source.stored_dtypes() if hasattr(source, "stored_dtypes") else {
        ("F8_E4M3" if source.fp8 else "F32") + " (random)": len(source.names())}
    return {
        "source": str(getattr(source, "path", "preset")),
        "layout": getattr(source, "layout", "random"),
        "config": cfg.to_dict(),
        "parameters": counts,
        "cache_bytes_per_token": cache,
        "cache_ratio": cache["naive"] / cache["latent"],
        "cache_bytes_32k": {k: v * 32768 for k, v in cache.items()},
        # The cache of one sequence filling the model's own context (a 2k model holds no 32k).
        "cache_bytes_full_context": {k: v * cfg.max_seq_len for k, v in cache.items()},
        "mtp": bool(source.has_mtp),
        "stored_dtypes": stored,
        "softmax_scale": cfg.softmax_scale,
        "yarn_active": cfg.yarn_active,
    }


def human_count(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)
