"""One model configuration for every checkpoint format.

Field names follow DeepSeek's `inference/model.py` `ModelArgs`; readers translate the Hugging Face
`config.json` (deepseek_v3 / deepseek_v2) and DeepSeek's own JSON into it. Presets are the shapes we
test and benchmark with, and the real model shapes for sizing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConfigError, read_json_object

SCORE_FUNCS = ("softmax", "sigmoid")
WEIGHT_DTYPES = ("fp32", "bf16", "fp16", "fp8")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    inter_dim: int
    moe_inter_dim: int
    n_layers: int
    n_heads: int
    n_dense_layers: int = 1
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    n_activated_experts: int = 6
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    score_func: str = "softmax"
    route_scale: float = 1.0
    # DeepSeek normalises the selected weights exactly when scores are sigmoids; HF makes it a flag.
    norm_topk_prob: bool | None = None
    q_lora_rank: int = 0
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    max_seq_len: int = 4096
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    norm_eps: float = 1e-6
    n_mtp_layers: int = 0
    tie_word_embeddings: bool = False
    weight_dtype: str = "bf16"
    fp8_block: tuple[int, int] | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.norm_topk_prob is None:
            object.__setattr__(self, "norm_topk_prob", self.score_func == "sigmoid")
        self.validate()

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one cached latent row: kv_norm(c_kv) and the rotated shared k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def naive_cache_dim(self) -> int:
        """Values cached per token per layer by naive MLA: per-head K and V."""
        return self.n_heads * (self.qk_head_dim + self.v_head_dim)

    @property
    def yarn_active(self) -> bool:
        # DeepSeek's reference applies YaRN only when the context exceeds the pretraining length.
        return self.max_seq_len > self.original_seq_len and self.rope_factor > 1

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.yarn_active:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale *= m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.n_dense_layers

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        if d["fp8_block"] is not None:
            d["fp8_block"] = list(d["fp8_block"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("fp8_block") is not None:
            d["fp8_block"] = tuple(d["fp8_block"])
        return _construct(cls, d, "config")

    # ---- validation -----------------------------------------------------------------------------
    def validate(self) -> None:
        positive = ["vocab_size", "dim", "inter_dim", "n_layers", "n_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_seq_len"]
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {getattr(self, name)!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"config field 'qk_rope_head_dim' must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ConfigError(f"config field 'n_dense_layers' ({self.n_dense_layers}) must be within 0..n_layers ({self.n_layers})")
        if self.q_lora_rank < 0:
            raise ConfigError(f"config field 'q_lora_rank' must be >= 0 (0 = no q compression), got {self.q_lora_rank}")
        if self.score_func not in SCORE_FUNCS:
            raise ConfigError(f"config field 'score_func' must be one of {SCORE_FUNCS}, got {self.score_func!r}")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ConfigError(f"config field 'weight_dtype' must be one of {WEIGHT_DTYPES}, got {self.weight_dtype!r}")
        if self.n_mtp_layers < 0:
            raise ConfigError(f"config field 'n_mtp_layers' must be >= 0, got {self.n_mtp_layers}")
        if self.n_dense_layers < self.n_layers or self.n_mtp_layers:
            # MoE is present (an MTP block at index n_layers is an MoE layer too).
            if self.n_routed_experts <= 0 or self.moe_inter_dim <= 0:
                raise ConfigError("config fields 'n_routed_experts' and 'moe_inter_dim' must be positive for MoE layers")
            if not 0 < self.n_activated_experts <= self.n_routed_experts:
                raise ConfigError(f"config field 'n_activated_experts' ({self.n_activated_experts}) must be within 1..n_routed_experts ({self.n_routed_experts})")
            if self.n_expert_groups <= 0 or self.n_routed_experts % self.n_expert_groups:
                raise ConfigError(f"config field 'n_expert_groups' ({self.n_expert_groups}) must divide n_routed_experts ({self.n_routed_experts})")
            if not 0 < self.n_limited_groups <= self.n_expert_groups:
                raise ConfigError(f"config field 'n_limited_groups' ({self.n_limited_groups}) must be within 1..n_expert_groups ({self.n_expert_groups})")
            per_group = self.n_routed_experts // self.n_expert_groups
            if self.n_expert_groups > 1 and per_group < 2 and self.score_func == "sigmoid":
                raise ConfigError("config field 'n_expert_groups' leaves fewer than 2 experts per group (top-2 group scores need 2)")
            if self.n_limited_groups * per_group < self.n_activated_experts:
                raise ConfigError(f"config field 'n_limited_groups' ({self.n_limited_groups}) keeps fewer experts than n_activated_experts ({self.n_activated_experts})")
        if self.fp8_block is not None and (len(self.fp8_block) != 2 or min(self.fp8_block) <= 0):
            raise ConfigError(f"config field 'fp8_block' must be two positive ints, got {self.fp8_block!r}")


def _construct(cls, d: dict[str, Any], origin: str) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        if d.get(name) is None:
            raise ConfigError(f"{origin}: missing field {name!r}")
    known = {k: v for k, v in d.items() if k in names}
    known.setdefault("extra", {k: v for k, v in d.items() if k not in names})
    try:
        return cls(**known)
    except TypeError as e:  # wrong value types surface here
        raise ConfigError(f"{origin}: {e}") from None


# ---- Hugging Face config.json -------------------------------------------------------------------
def _hf_required(hf: dict, key: str, origin: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(f"{origin}: missing field {key!r}")
    return hf[key]


def from_hf_dict(hf: dict[str, Any], origin: str = "config.json") -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        raise ConfigError(f"{origin}: model_type {model_type!r} is not deepseek_v3 or deepseek_v2")
    req = lambda k: _hf_required(hf, k, origin)  # noqa: E731
    n_layers = int(req("num_hidden_layers"))
    v3 = model_type == "deepseek_v3"
    score_func = hf.get("scoring_func", "sigmoid" if v3 else "softmax")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    max_pos = int(hf.get("max_position_embeddings", 4096))
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    yarn = {}
    if rope_type == "yarn":
        factor = rope.get("factor")
        orig = int(rope.get("original_max_position_embeddings", max_pos))
        yarn = dict(
            rope_factor=float(factor if factor is not None else max_pos / orig),
            original_seq_len=orig,
            beta_fast=float(rope.get("beta_fast") or 32),
            beta_slow=float(rope.get("beta_slow") or 1),
            # HF scales the softmax by mscale_all_dim; DeepSeek's ModelArgs.mscale is that same number.
            mscale=float(rope.get("mscale_all_dim") or 0.0),
        )
    elif rope_type not in ("default", None):
        raise ConfigError(f"{origin}: rope type {rope_type!r} is not supported (only yarn or default)")
    else:
        yarn = dict(rope_factor=1.0, original_seq_len=max_pos)
    quant = hf.get("quantization_config") or {}
    fp8_block = None
    weight_dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(
        str(hf.get("dtype", hf.get("torch_dtype", "bfloat16"))), "bf16")
    if quant:
        if quant.get("quant_method") != "fp8":
            raise ConfigError(f"{origin}: quantization_config quant_method {quant.get('quant_method')!r} is not supported (only fp8)")
        fp8_block = tuple(int(v) for v in quant.get("weight_block_size", (128, 128)))
        weight_dtype = "fp8"
    eos = hf.get("eos_token_id", 1)
    topk = hf.get("num_experts_per_tok")
    d = dict(
        vocab_size=req("vocab_size"), dim=req("hidden_size"), inter_dim=req("intermediate_size"),
        moe_inter_dim=hf.get("moe_intermediate_size") or 0, n_layers=n_layers,
        n_heads=req("num_attention_heads"),
        n_dense_layers=min(int(hf.get("first_k_dense_replace") or 0), n_layers)
        if hf.get("n_routed_experts") else n_layers,
        n_routed_experts=hf.get("n_routed_experts") or 0,
        n_shared_experts=hf.get("n_shared_experts") or 0,
        n_activated_experts=topk or 0,
        n_expert_groups=hf.get("n_group") or 1,
        n_limited_groups=hf.get("topk_group") or 1,
        score_func=score_func,
        route_scale=float(hf.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=hf.get("norm_topk_prob"),
        q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=req("kv_lora_rank"), qk_nope_head_dim=req("qk_nope_head_dim"),
        qk_rope_head_dim=req("qk_rope_head_dim"), v_head_dim=req("v_head_dim"),
        max_seq_len=max_pos, rope_theta=theta, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        n_mtp_layers=int(hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        weight_dtype=weight_dtype, fp8_block=fp8_block,
        bos_token_id=hf.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,
        extra={"rope_interleave": hf.get("rope_interleave", True), "model_type": model_type},
        **yarn,
    )
    if score_func not in SCORE_FUNCS:
        raise ConfigError(f"{origin}: field 'scoring_func' must be one of {SCORE_FUNCS}, got {score_func!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{origin}: field 'hidden_act' {hf.get('hidden_act')!r} is not supported (only silu)")
    if hf.get("attention_bias"):
        raise ConfigError(f"{origin}: field 'attention_bias' true is not supported")
    heads_kv = hf.get("num_key_value_heads")
    if heads_kv not in (None, d["n_heads"]):
        raise ConfigError(f"{origin}: field 'num_key_value_heads' must equal num_attention_heads for MLA")
    return _construct(ModelConfig, d, origin)


# ---- DeepSeek's ModelArgs JSON ------------------------------------------------------------------
# ModelArgs' own defaults (DeepSeek inference/model.py) for fields its JSON files may omit.
_MODELARGS_DEFAULTS = dict(
    vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=27, n_dense_layers=1,
    n_heads=16, n_routed_experts=64, n_shared_experts=2, n_activated_experts=6, n_expert_groups=1,
    n_limited_groups=1, score_func="softmax", route_scale=1.0, q_lora_rank=0, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, original_seq_len=4096,
    rope_theta=10000.0, rope_factor=40, beta_fast=32, beta_slow=1, mscale=1.0, max_seq_len=4096 * 4,
)
_MODELARGS_REQUIRED = ("vocab_size", "dim", "n_layers", "n_heads")


def from_modelargs_dict(args: dict[str, Any], origin: str = "ModelArgs JSON") -> ModelConfig:
    for k in _MODELARGS_REQUIRED:
        if args.get(k) is None:
            raise ConfigError(f"{origin}: missing field {k!r}")
    if args.get("score_func", "softmax") not in SCORE_FUNCS:
        raise ConfigError(f"{origin}: field 'score_func' must be one of {SCORE_FUNCS}, got {args['score_func']!r}")
    d = {**_MODELARGS_DEFAULTS, **{k: v for k, v in args.items() if k not in ("dtype", "max_batch_size")}}
    dtype = args.get("dtype", "bf16")
    d["weight_dtype"] = "fp8" if dtype == "fp8" else "bf16"
    d["fp8_block"] = (128, 128) if dtype == "fp8" else None
    for k in ("rope_factor", "beta_fast", "beta_slow", "mscale", "rope_theta", "route_scale"):
        d[k] = float(d[k])
    return _construct(ModelConfig, d, origin)


# ---- presets ------------------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # Tests: seconds on a CPU, yet every feature on (q compression, groups with a limit, YaRN, MTP).
    "tiny": dict(
        vocab_size=512, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=3, n_dense_layers=1, n_heads=4,
        n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2,
        score_func="sigmoid", route_scale=2.5, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, max_seq_len=1024, original_seq_len=256, rope_factor=4.0,
        mscale=1.0, n_mtp_layers=1, weight_dtype="fp32",
    ),
    # The embedded demo model (exporter/data/demo, trained by tools/train_demo.py on the Python
    # standard library): every DeepSeek-V3 feature at a size that trains on 2 CPU cores in 25 minutes
    # and ships in under 20 MB (bf16).
    "demo": dict(
        vocab_size=4096, dim=256, inter_dim=768, moe_inter_dim=64, n_layers=6, n_dense_layers=1, n_heads=8,
        n_routed_experts=8, n_shared_experts=2, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1,
        score_func="sigmoid", route_scale=1.0, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=32, v_head_dim=32, max_seq_len=2048, original_seq_len=2048, rope_factor=1.0,
        n_mtp_layers=1, weight_dtype="bf16",
    ),
    # Benchmarks: big enough that matmuls dominate, small enough for 2 cores.
    "small": dict(
        vocab_size=32000, dim=1024, inter_dim=2816, moe_inter_dim=512, n_layers=8, n_dense_layers=1,
        n_heads=16, n_routed_experts=32, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4,
        n_limited_groups=2, score_func="sigmoid", route_scale=2.5, q_lora_rank=384, kv_lora_rank=256,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, max_seq_len=8192, original_seq_len=4096,
        rope_factor=4.0, mscale=1.0, n_mtp_layers=1, weight_dtype="bf16",
    ),
    # DeepSeek-V2-Lite (16B).
    "v2-lite": dict(
        vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=27, n_dense_layers=1,
        n_heads=16, n_routed_experts=64, n_shared_experts=2, n_activated_experts=6, n_expert_groups=1,
        n_limited_groups=1, score_func="softmax", route_scale=1.0, q_lora_rank=0, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_seq_len=163840,
        original_seq_len=4096, rope_factor=40.0, mscale=0.707, weight_dtype="bf16",
    ),
    # DeepSeek-V2 (236B).
    "v2": dict(
        vocab_size=102400, dim=5120, inter_dim=12288, moe_inter_dim=1536, n_layers=60, n_dense_layers=1,
        n_heads=128, n_routed_experts=160, n_shared_experts=2, n_activated_experts=6, n_expert_groups=8,
        n_limited_groups=3, score_func="softmax", route_scale=16.0, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_seq_len=163840,
        original_seq_len=4096, rope_factor=40.0, mscale=0.707, weight_dtype="bf16",
    ),
    # DeepSeek-V3 (671B), as released: FP8 weights with 128x128 block scales and one MTP layer.
    "v3": dict(
        vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61, n_dense_layers=3,
        n_heads=128, n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8,
        n_limited_groups=4, score_func="sigmoid", route_scale=2.5, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_seq_len=163840,
        original_seq_len=4096, rope_factor=40.0, mscale=1.0, n_mtp_layers=1, weight_dtype="fp8",
        fp8_block=(128, 128),
    ),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return ModelConfig(**PRESETS[name])


def load_config(source: str | Path) -> ModelConfig:
    """A preset name, a config JSON file (HF or ModelArgs), or a checkpoint directory holding one."""
    if isinstance(source, str) and source in PRESETS:
        return preset(source)
    path = Path(source)
    if path.is_dir():
        for name in ("config.json", "params.json", "model_args.json"):
            if (path / name).is_file():
                return load_config(path / name)
        raise ConfigError(f"{path}: no config.json (or DeepSeek ModelArgs JSON) in this directory")
    if not path.is_file():
        raise ConfigError(f"{source}: not a preset ({', '.join(PRESETS)}), a config file or a checkpoint directory")
    d = read_json_object(path, ConfigError)
    if "model_type" in d:
        return from_hf_dict(d, str(path))
    return from_modelargs_dict(d, str(path))


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The Hugging Face deepseek_v3 config.json for a config (used when we write checkpoints)."""
    d: dict[str, Any] = dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.inter_dim,
        moe_intermediate_size=cfg.moe_inter_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_routed_experts,
        routed_scaling_factor=cfg.route_scale, kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank or None, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim,
        n_group=cfg.n_expert_groups, topk_group=cfg.n_limited_groups,
        num_experts_per_tok=cfg.n_activated_experts, first_k_dense_replace=cfg.n_dense_layers,
        norm_topk_prob=cfg.norm_topk_prob, scoring_func=cfg.score_func, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, rope_interleave=True, tie_word_embeddings=cfg.tie_word_embeddings,
        num_nextn_predict_layers=cfg.n_mtp_layers, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, attention_bias=False,
        dtype={"fp8": "bfloat16", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[cfg.weight_dtype],
    )
    if cfg.rope_factor > 1:
        d["rope_scaling"] = dict(
            type="yarn", rope_type="yarn", factor=cfg.rope_factor,
            original_max_position_embeddings=cfg.original_seq_len, beta_fast=cfg.beta_fast,
            beta_slow=cfg.beta_slow, mscale=cfg.mscale, mscale_all_dim=cfg.mscale,
        )
    if cfg.weight_dtype == "fp8":
        d["quantization_config"] = dict(
            quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
            weight_block_size=list(cfg.fp8_block or (128, 128)),
        )
    return d
