"""Sizing a model over N GPUs: `dsv3-export inspect SOURCE --plan NxDEVICE` (docs/deploy.md, "Sizing").

From the config alone (nobody has to download 671B to size it): the stage plan `plan_stages` would
cut, and per stage the weight bytes, an activation estimate, a runtime reserve, the latent cache per
token of the stage's layers, and how many cached tokens the rest of the GPU holds. Every token has
its cache on every stage, so the pipeline holds as many tokens as its tightest stage.

Units: device memory is the vendor's figure in GB (10^9 bytes). That errs on the safe side: the
cards report a little more (an H200's 143,771 MiB is 150.8 GB, an H100's 81,559 MiB 85.5 GB).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dsv3_export.core.config import ModelConfig
from dsv3_export.core.errors import ExportError
from dsv3_export.exporter.describe import CACHE_DTYPE_BYTES, human_bytes
from dsv3_export.exporter.precision_policy import check_precision
from dsv3_export.exporter.stage_plan import Stage, model_bytes, plan_stages

GB = 10**9
GIB = 2**30

# Memory per GPU, GB (10^9 bytes) as the vendors publish it. B200: 192 GB of HBM, of which NVIDIA's
# HGX/DGX B200 systems expose 180 GB per GPU (1,440 GB for eight): the figure a plan can count on.
DEVICES: dict[str, int] = {
    "H200": 141 * GB,
    "H100": 80 * GB,
    "H800": 80 * GB,
    "H20": 96 * GB,
    "A100": 80 * GB,
    "A100-40": 40 * GB,
    "L40S": 48 * GB,
    "B200": 180 * GB,
    "MI300X": 192 * GB,
}

# Defaults of a plan, stated here and in docs/deploy.md.
DEFAULT_BATCH = 32  # sequences decoding at once (cache slots)
DEFAULT_PREFILL = 2048  # prompt tokens in one call: TensorRT's max_prefill cap (docs/tensorrt.md)
ACT_BYTES = 4  # the graphs compute in float32 between their quantized matmuls
RESERVE_FRACTION = 0.05  # CUDA context, allocator fragmentation, NCCL buffers
# TensorRT's workspace pool limit (engines.trt TrtOptions.workspace_gib, 8): scratch the engine may
# take on top of its activations. Repeated here because exporter cannot import engines (a sibling).
WORKSPACE_BYTES = 8 * GIB

_UNITS = {"gb": GB, "gib": GIB, "tb": 10**12, "tib": 2**40}
_PLAN = re.compile(r"^\s*(\d+)\s*[x×]\s*(\S+?)\s*$", re.IGNORECASE)
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(gb|gib|tb|tib)$", re.IGNORECASE)


@dataclass(frozen=True)
class Devices:
    """N identical GPUs: `--plan 8xH200` or `--plan 8x80GB`."""

    count: int
    name: str  # the table's name, or the size as given ("80GB")
    memory: int  # bytes per GPU

    def to_dict(self) -> dict:
        return {"count": self.count, "name": self.name, "memory_bytes": self.memory}


def parse_plan(text: str) -> Devices:
    """"8xH200", "4xH100", "8x80GB", "2x141GiB" (case-insensitive) -> Devices; anything else one
    ExportError naming --plan and the known devices."""
    known = ", ".join(DEVICES)
    hint = f"expected NxDEVICE or NxSIZE, e.g. 8xH200 or 8x80GB (devices: {known}; sizes in GB, GiB, TB, TiB)"
    m = _PLAN.match(str(text))
    if not m:
        raise ExportError(f"--plan {text!r}: {hint}")
    count, device = int(m.group(1)), m.group(2)
    if count < 1:
        raise ExportError(f"--plan {text!r}: the device count must be at least 1")
    by_name = {k.lower(): k for k in DEVICES}
    if device.lower() in by_name:
        name = by_name[device.lower()]
        return Devices(count, name, DEVICES[name])
    size = _SIZE.match(device)
    if not size:
        raise ExportError(f"--plan {text!r}: unknown device {device!r}; {hint}")
    memory = int(float(size.group(1)) * _UNITS[size.group(2).lower()])
    if memory <= 0:
        raise ExportError(f"--plan {text!r}: the device memory must be positive")
    return Devices(count, device, memory)


def step_tokens(cfg: ModelConfig, batch: int, prefill: int, mtp: bool) -> int:
    """Tokens in the largest call a stage runs: a prefill chunk, or a decode step of the whole batch
    (two tokens a sequence when MTP drafts one and the next step verifies it)."""
    per_sequence = 1 + (cfg.n_mtp_layers if mtp else 0)
    return max(prefill, batch * per_sequence)


def activation_bytes(cfg: ModelConfig, stage: Stage, tokens: int, mtp: bool, act_bytes: int = ACT_BYTES) -> int:
    """Peak activation memory of one stage for a call of `tokens` tokens (T), in float32.

    Layers run one after another and free their intermediates, so the peak is the residual stream
    plus the largest single sublayer, plus the logits on the head stage:
      stream    4 T dim: hidden states from the previous stage, residual, normed input, sublayer out
      attention T (q_lora + heads (latent + kv_lora + v_head) + latent): the low-rank query, the
                absorbed queries, the output in the latent and per head, the new latent rows. The
                LatentAttention kernel streams the cache in tiles: no T x context score matrix.
      dense FFN 3 T inter_dim: gate, up and their product
      MoE       T (experts + top_k (dim + 3 moe_inter) + 3 shared moe_inter): router scores, one
                token copy and gate/up/product per selected expert, the shared experts
      logits    T vocab per head: the main model's, and MTP's when it rides on this stage
    """
    T = tokens
    stream = 4 * T * cfg.dim
    attention = T * (cfg.q_lora_rank + cfg.n_heads * (cfg.latent_dim + cfg.kv_lora_rank + cfg.v_head_dim)
                     + cfg.latent_dim)
    dense = 3 * T * cfg.inter_dim
    moe = T * (cfg.n_routed_experts + cfg.n_activated_experts * (cfg.dim + 3 * cfg.moe_inter_dim)
               + 3 * cfg.n_shared_experts * cfg.moe_inter_dim)
    with_mtp = stage.head and mtp and cfg.n_mtp_layers > 0
    has_dense = any(not cfg.is_moe_layer(i) for i in stage.layers)
    has_moe = any(cfg.is_moe_layer(i) for i in stage.layers) or with_mtp  # the MTP layer is a MoE layer
    ffn = max(dense if has_dense else 0, moe if has_moe else 0)
    logits = T * cfg.vocab_size * (1 + (cfg.n_mtp_layers if with_mtp else 0)) if stage.head else 0
    return act_bytes * (stream + max(attention, ffn) + logits)


def cache_bytes_per_token(cfg: ModelConfig, stage: Stage, mtp: bool, dtype_bytes: int) -> int:
    """The latent cache one token costs on this stage: a latent row per layer it owns (and per MTP
    layer on the head stage, which keeps its own cache)."""
    layers = len(stage.layers) + (cfg.n_mtp_layers if stage.head and mtp else 0)
    return layers * cfg.latent_dim * dtype_bytes


def _check_args(cfg: ModelConfig, devices: int, device_bytes: int, batch: int, context, prefill: int) -> None:
    if not isinstance(devices, int) or devices < 1:
        raise ExportError(f"--plan: the device count must be a positive integer, got {devices!r}")
    if devices > cfg.n_layers:
        raise ExportError(f"--plan: {devices} GPUs, but the model has only {cfg.n_layers} layers "
                          "(one stage per GPU, at least one layer per stage)")
    for flag, value in (("device memory", device_bytes), ("--batch", batch), ("--prefill", prefill)):
        if not isinstance(value, int) or value < 1:
            raise ExportError(f"{flag} must be a positive integer, got {value!r}")
    if context is not None and (not isinstance(context, int) or context < 1):
        raise ExportError(f"--context must be a positive integer, got {context!r}")


def _size_stage(cfg, stage: Stage, device_bytes: int, tokens: int, reserve: int, mtp: bool,
                cache_dtype_bytes: int) -> dict:
    """One stage's figures before the pipeline's common token count is known."""
    act = activation_bytes(cfg, stage, tokens, mtp)
    per_token = cache_bytes_per_token(cfg, stage, mtp, cache_dtype_bytes)
    free = device_bytes - stage.weight_bytes - act - reserve  # negative: the stage does not fit
    return {
        "index": stage.index, "layers": [stage.first_layer, stage.end_layer], "n_layers": len(stage.layers),
        "embed": stage.embed, "head": stage.head, "mtp": stage.head and mtp and cfg.n_mtp_layers > 0,
        "weight_bytes": stage.weight_bytes, "activation_bytes": act, "reserve_bytes": reserve,
        "cache_bytes_per_token": per_token, "free_bytes": free, "cache_tokens": max(free, 0) // per_token,
    }


def size_plan(cfg: ModelConfig, devices: int, device_bytes: int, precision: str = "fp32", *,
              batch: int = DEFAULT_BATCH, context: int | None = None, prefill: int = DEFAULT_PREFILL,
              cache_dtype_bytes: int = CACHE_DTYPE_BYTES, reserve_fraction: float = RESERVE_FRACTION,
              workspace_bytes: int = WORKSPACE_BYTES, keep_fp=None, mtp: bool = True) -> dict:
    """The plan of `cfg` over `devices` GPUs of `device_bytes` each, at `precision` (module docstring).

    Per stage: weights, activations (activation_bytes), reserve (reserve_fraction of the device plus
    workspace_bytes), cache bytes per token, free bytes after those three, the tokens this stage's
    free bytes hold, then at the pipeline's token count (the smallest stage's): its cache bytes,
    used bytes and headroom. The plan fits when every stage holds `batch` sequences of `context`
    tokens (without a context: one token each, i.e. the weights, activations and reserve fit);
    otherwise "fits" is False and "shortfall_bytes" says by how much the tightest stage misses.
    """
    check_precision(precision)
    _check_args(cfg, devices, device_bytes, batch, context, prefill)
    mtp = bool(mtp and cfg.n_mtp_layers)
    stages = plan_stages(cfg, devices, precision, keep_fp, mtp=mtp)
    tokens = step_tokens(cfg, batch, prefill, mtp)
    reserve = int(reserve_fraction * device_bytes) + workspace_bytes
    rows = [_size_stage(cfg, s, device_bytes, tokens, reserve, mtp, cache_dtype_bytes) for s in stages]
    pipeline_tokens = min(r["cache_tokens"] for r in rows)
    needed_tokens = batch * (context or 1)
    for r in rows:
        r["cache_bytes"] = pipeline_tokens * r["cache_bytes_per_token"]
        r["used_bytes"] = r["weight_bytes"] + r["activation_bytes"] + r["reserve_bytes"] + r["cache_bytes"]
        r["headroom_bytes"] = device_bytes - r["used_bytes"]
        r["shortfall_bytes"] = max(0, needed_tokens * r["cache_bytes_per_token"] - r["free_bytes"])
        r["fits"] = r["shortfall_bytes"] == 0
    total = model_bytes(cfg, precision, keep_fp, mtp=mtp)
    worst = max(rows, key=lambda r: r["shortfall_bytes"])
    return {
        "devices": devices, "device_bytes": device_bytes, "precision": precision, "batch": batch,
        "context": context, "prefill": prefill, "step_tokens": tokens, "cache_dtype_bytes": cache_dtype_bytes,
        "act_bytes": ACT_BYTES, "reserve_fraction": reserve_fraction, "workspace_bytes": workspace_bytes,
        "mtp": mtp, "stages": rows,
        "totals": {
            **{k: sum(r[k] for r in rows) for k in ("weight_bytes", "activation_bytes", "reserve_bytes",
                                                      "cache_bytes", "used_bytes", "headroom_bytes")},
            "model_weight_bytes": total, "device_bytes": devices * device_bytes,
            "cache_bytes_per_token": sum(r["cache_bytes_per_token"] for r in rows),
            "cache_tokens": pipeline_tokens, "tokens_per_sequence": pipeline_tokens // batch,
            "max_batch_at_context": pipeline_tokens // context if context else None,
            "model_context": cfg.max_seq_len, "max_batch_at_model_context": pipeline_tokens // cfg.max_seq_len,
            "binding_stage": min(rows, key=lambda r: r["cache_tokens"])["index"],
        },
        "fits": all(r["fits"] for r in rows),
        "shortfall_bytes": worst["shortfall_bytes"],
        "short_stage": worst["index"] if worst["shortfall_bytes"] else None,
        "fits_without_cache": all(r["free_bytes"] >= 0 for r in rows),  # weights, activations, reserve
    }


# ---- the plan as text (what `inspect --plan` prints) ------------------------------------------------
COLUMNS = ("stage", "layers", "weights", "activations", "reserve", "cache / token", "tokens fit", "cache", "used",
           "headroom")


def _signed_bytes(n: int) -> str:
    return human_bytes(n) if n >= 0 else f"-{human_bytes(-n)}"  # headroom: negative where a stage does not fit


def summary_lines(plan: dict, devices: Devices, source: str) -> list[str]:
    """The plan in a few lines; the last one the verdict ("fits" or "does not fit: ...")."""
    tot, batch, context, hb = plan["totals"], plan["batch"], plan["context"], human_bytes
    dtype = {1: "fp8", 2: "bf16", 4: "fp32"}.get(plan["cache_dtype_bytes"], f"{plan['cache_dtype_bytes']}-byte")
    same = "=" if tot["weight_bytes"] == tot["model_weight_bytes"] else "!="
    n = plan["devices"]
    lines = [
        (f"{source} on {devices.count} x {devices.name} ({devices.memory / GB:.0f} GB = {hb(devices.memory)} each), "
         f"{plan['precision']}, batch {batch}, calls of up to {plan['step_tokens']} tokens, {dtype} latent cache"),
        (f"weights {hb(tot['weight_bytes'])} in {n} stage{'s' if n > 1 else ''} ({same} the model's "
         f"{hb(tot['model_weight_bytes'])}); reserve {plan['reserve_fraction']:.0%} of each GPU + "
         f"{hb(plan['workspace_bytes'])} workspace"),
        (f"cache: {tot['cache_tokens']:,} tokens per GPU (stage {tot['binding_stage']} binds), "
         f"{tot['tokens_per_sequence']:,} per sequence at batch {batch}; at the model's full context "
         f"({tot['model_context']:,}): {tot['max_batch_at_model_context']:,} sequences"),
    ]
    if context:
        lines.append(f"context {context:,} x batch {batch} = {batch * context:,} tokens; at that context up to "
                     f"{tot['max_batch_at_context']:,} sequences")
    if plan["fits"]:
        lines.append("fits")
    else:
        alone = "" if plan["fits_without_cache"] else ": its weights, activations and reserve alone exceed the GPU"
        lines.append(f"does not fit: stage {plan['short_stage']} is short by {hb(plan['shortfall_bytes'])} "
                     f"for {batch} x {context or 1:,} cached tokens{alone}")
    return lines


def table_rows(plan: dict) -> list[list[str]]:
    """One row per stage under COLUMNS, then the totals row ("all": the pipeline's tokens, the rest summed)."""
    rows = []
    n_layers = sum(r["n_layers"] for r in plan["stages"])
    for r in plan["stages"] + [{**plan["totals"], "index": "all"}]:
        if r["index"] == "all":
            layers = f"{n_layers} layers"
        else:
            parts = [p for p, on in (("embed", r["embed"]), ("head", r["head"]), ("MTP", r["mtp"])) if on]
            layers = f"{r['layers'][0]}-{r['layers'][1] - 1}" + (f" + {', '.join(parts)}" if parts else "")
        rows.append([str(r["index"]), layers, *(human_bytes(r[k]) for k in ("weight_bytes", "activation_bytes",
                     "reserve_bytes")), f"{r['cache_bytes_per_token']:,} B", f"{r['cache_tokens']:,}",
                     human_bytes(r["cache_bytes"]), human_bytes(r["used_bytes"]), _signed_bytes(r["headroom_bytes"])])
    return rows
