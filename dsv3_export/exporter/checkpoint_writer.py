"""Writing checkpoints: seeded random ones for any preset or config (`make-checkpoint`), in the
Hugging Face layout or DeepSeek's converted one, optionally FP8 with 128×128 block scales, with a
byte-level BPE tokenizer trained on text every Python install ships (its standard library).

Tensors are made and written shard by shard, so a large random checkpoint never sits in memory whole.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

import dsv3_export.exporter.names as names
from dsv3_export.core.config import ModelConfig, load_config, to_hf_dict
from dsv3_export.core.errors import ExportError
from dsv3_export.exporter.tokenizer_training import train_tokenizer
from dsv3_export.exporter.weights import RandomWeights

SHARD_BYTES = 512 * 2**20


def _nbytes(shape: tuple[int, ...], fp8: bool) -> int:
    return math.prod(shape) * (1 if fp8 else 4)


def _plan_shards(tensor_names: list[str], size_of: Callable[[str], int], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for n in tensor_names:
        if shards[-1] and used + size_of(n) > limit:
            shards.append([])
            used = 0
        shards[-1].append(n)
        used += size_of(n)
    return shards


def write_hf(source, out: Path, *, dtype: str = "fp32", shard_bytes: int = SHARD_BYTES,
             progress: Callable[[int], None] | None = None) -> None:
    """Hugging Face layout: config.json, sharded safetensors with an index when more than one shard."""
    cfg = source.config
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    tensor_names = source.names()
    block = source.block

    def size_of(n: str) -> int:
        if n.endswith(".scale"):
            out, inp = source.shapes[n[: -len("scale")] + "weight"]
            return 4 * math.ceil(out / block[0]) * math.ceil(inp / block[1])
        return _nbytes(source.shapes[n], source.is_fp8(n))

    sizes = {n: size_of(n) for n in tensor_names}
    shards = _plan_shards(tensor_names, sizes.__getitem__, shard_bytes)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for n in shard:
            t = source.get(n)
            if t.dtype == torch.float32 and not n.endswith(".scale") and not n.endswith(".gate.weight") \
                    and not n.endswith(".gate.bias"):
                t = t.to(torch_dtype)  # the router and the fp8 multipliers stay fp32, as DeepSeek stores them
            tensors[names.to_hf(n)] = t.contiguous()
            weight_map[names.to_hf(n)] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        if progress:
            progress(len(shard))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = to_hf_dict(cfg.replace(weight_dtype="fp8" if source.fp8 else dtype))
    (out / "config.json").write_text(json.dumps(hf, indent=2))


def modelargs_dict(cfg: ModelConfig) -> dict:
    """DeepSeek's ModelArgs JSON (inference/configs/config_*.json) for a config."""
    keys = ["vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_dense_layers", "n_heads",
            "n_routed_experts", "n_shared_experts", "n_activated_experts", "n_expert_groups", "n_limited_groups",
            "route_scale", "score_func", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
            "v_head_dim", "max_seq_len", "original_seq_len", "rope_theta", "rope_factor", "beta_fast",
            "beta_slow", "mscale"]
    d = {k: getattr(cfg, k) for k in keys}
    d["dtype"] = "fp8" if cfg.weight_dtype == "fp8" else "bf16"
    return d


def write_deepseek(source, out: Path, *, mp: int = 1, dtype: str = "fp32",
                   progress: Callable[[int], None] | None = None) -> None:
    """DeepSeek's converted layout, model{r}-mp{mp}.safetensors, split as its convert.py splits:
    experts by rank, column/row-parallel weights along their dim, the rest replicated. Like
    convert.py, the MTP layer is not written."""
    cfg = source.config
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if cfg.n_routed_experts % mp:
        raise ExportError(f"--mp {mp} does not divide n_routed_experts ({cfg.n_routed_experts})")
    per_rank = cfg.n_routed_experts // mp
    mtp_prefix = f"layers.{cfg.n_layers}."
    tensor_names = [n for n in source.names() if not n.startswith(mtp_prefix)]
    for r in range(mp):
        tensors = {}
        for n in tensor_names:
            e = names.expert_index(n)
            if e is not None and e // per_rank != r:
                continue
            t = source.get(n)
            if t.dtype == torch.float32 and not n.endswith((".scale", ".gate.weight", ".gate.bias")):
                t = t.to(torch_dtype)
            dim = names.mp_shard_dim(n)
            if dim is not None and mp > 1:
                if t.shape[dim] % mp:
                    raise ExportError(f"tensor {n!r}: dim {dim} ({t.shape[dim]}) does not split into {mp} shards")
                t = t.chunk(mp, dim)[r]
            tensors[n] = t.contiguous()
        save_file(tensors, str(out / f"model{r}-mp{mp}.safetensors"), metadata={"format": "pt"})
        if progress:
            progress(len(tensors))
    (out / "config.json").write_text(json.dumps(modelargs_dict(cfg.replace(n_mtp_layers=0)), indent=2))


def make_checkpoint(config: str | Path | ModelConfig, out: str | Path, *, fp8: bool = False, seed: int = 0,
                    dtype: str = "fp32", layout: str = "hf", mp: int = 1, force: bool = False,
                    progress: Callable[[int], None] | None = None) -> Path:
    """Write a seeded random checkpoint; atomic (a temporary sibling renamed at the end)."""
    cfg = config if isinstance(config, ModelConfig) else load_config(config)
    cfg = cfg.replace(weight_dtype="fp8" if fp8 else dtype, fp8_block=(128, 128) if fp8 else None)
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out}: already exists (use --force to replace it)")
    source = RandomWeights(cfg, seed=seed, fp8=fp8)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if layout == "hf":
            write_hf(source, tmp, dtype=dtype, progress=progress)
        elif layout == "deepseek":
            write_deepseek(source, tmp, mp=mp, dtype=dtype, progress=progress)
        else:
            raise ExportError(f"unknown layout {layout!r} (hf or deepseek)")
        train_tokenizer(cfg.vocab_size).save(str(tmp / "tokenizer.json"))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
