"""One model configuration for every checkpoint format.

Field names follow DeepSeek's `inference/model.py` `ModelArgs`; readers translate the Hugging Face
`config.json` (deepseek_v3 / deepseek_v2) and DeepSeek's own JSON into it. Presets are the shapes we
test and benchmark with, and the real model shapes for sizing.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dsv3_export.core.errors import ConfigError, read_json_object

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
    def from_dict(cls, d: dict[str, Any], origin: str = "manifest.json") -> "ModelConfig":
        """A config as `to_dict` wrote it (a build's manifest.json "config"); errors name `origin`."""
        if not isinstance(d, dict):
            raise ConfigError(f"{origin}: config must be an object, got {_show(d)}")
        d = dict(d)
        if isinstance(d.get("fp8_block"), list):
            d["fp8_block"] = tuple(d["fp8_block"])
        return _construct(cls, d, origin, lambda n: f"config.{n}")

    # ---- validation -----------------------------------------------------------------------------
    def validate(self) -> None:
        """Types, ranges and relations of every field (`check_fields`, with our own field names)."""
        check_fields({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"},
                     "config", str)


def _construct(cls, d: dict[str, Any], origin: str, label: Callable[[str], str] = str) -> ModelConfig:
    """The config from our field names, every field checked first (errors name `origin` and the
    source's own field names through `label`)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, f in fields.items():
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and d.get(name) is None:
            raise ConfigError(f"{origin}: missing field {label(name)!r}")
    known = {k: v for k, v in d.items() if k in fields}
    known.setdefault("extra", {k: v for k, v in d.items() if k not in fields})
    values = {name: known.get(name, f.default) for name, f in fields.items() if name != "extra"}
    check_fields(values, origin, label)
    try:
        return cls(**known)
    except TypeError as e:  # pragma: no cover - check_fields covers the types
        raise ConfigError(f"{origin}: {e}") from None


# ---- the one place that checks fields ------------------------------------------------------------
def _show(v: Any) -> str:
    """A value as it reads in the JSON it came from ("three", true, [], null)."""
    try:
        return json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "pos_int": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "nonneg_int": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "pos_num": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "num": (_is_num, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "token_id": (lambda v: _is_int(v) and v >= 0, "a token id (an integer >= 0)"),
    "block": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v),
              "two positive integers"),
}


def check_value(value: Any, kind: str, origin: str, label: str) -> Any:
    """`value` if it is of `kind` (KINDS), else one ConfigError: `origin: label must be ..., got ...`."""
    ok, what = KINDS[kind]
    if not ok(value):
        raise ConfigError(f"{origin}: {label} must be {what}, got {_show(value)}")
    return value


# Our fields' kinds (None allowed where marked "?": absent token ids, the derived norm_topk_prob).
FIELD_KINDS: dict[str, str] = dict(
    vocab_size="pos_int", dim="pos_int", inter_dim="pos_int", moe_inter_dim="nonneg_int", n_layers="pos_int",
    n_heads="pos_int", n_dense_layers="nonneg_int", n_routed_experts="nonneg_int", n_shared_experts="nonneg_int",
    n_activated_experts="nonneg_int", n_expert_groups="pos_int", n_limited_groups="pos_int", score_func="str",
    route_scale="pos_num", norm_topk_prob="bool?", q_lora_rank="nonneg_int", kv_lora_rank="pos_int",
    qk_nope_head_dim="pos_int", qk_rope_head_dim="pos_int", v_head_dim="pos_int", max_seq_len="pos_int",
    original_seq_len="pos_int", rope_theta="pos_num", rope_factor="pos_num", beta_fast="num", beta_slow="num",
    mscale="num", norm_eps="pos_num", n_mtp_layers="nonneg_int", tie_word_embeddings="bool", weight_dtype="str",
    fp8_block="block?", bos_token_id="token_id?", eos_token_id="token_id?",
)


def check_fields(v: dict[str, Any], origin: str, label: Callable[[str], str] = str) -> None:
    """Every field of a config (our names, in `v`) by type and range, then the relations between
    them. Messages name `origin` (the file) and the source's own field names (`label`)."""
    for name, kind in FIELD_KINDS.items():
        value = v.get(name)
        if kind.endswith("?"):
            if value is None:
                continue
            kind = kind[:-1]
        check_value(value, kind, origin, label(name))

    def fail(msg: str):
        raise ConfigError(f"{origin}: {msg}")

    L = label  # noqa: N806
    if v["score_func"] not in SCORE_FUNCS:
        fail(f"{L('score_func')} must be one of {', '.join(SCORE_FUNCS)}, got {_show(v['score_func'])}")
    if v["weight_dtype"] not in WEIGHT_DTYPES:
        fail(f"{L('weight_dtype')} must be one of {', '.join(WEIGHT_DTYPES)}, got {_show(v['weight_dtype'])}")
    if v["qk_rope_head_dim"] % 2:
        fail(f"{L('qk_rope_head_dim')} must be even (RoPE rotates pairs), got {v['qk_rope_head_dim']}")
    if v["n_dense_layers"] > v["n_layers"]:
        fail(f"{L('n_dense_layers')} ({v['n_dense_layers']}) must be within 0..{L('n_layers')} ({v['n_layers']})")
    for tok in ("bos_token_id", "eos_token_id"):
        if v.get(tok) is not None and v[tok] >= v["vocab_size"]:
            fail(f"{L(tok)} ({v[tok]}) is outside the vocabulary ({L('vocab_size')} {v['vocab_size']})")
    if v["n_dense_layers"] < v["n_layers"] or v["n_mtp_layers"]:
        # MoE is present (an MTP block at index n_layers is an MoE layer too).
        e, k, g, lg = v["n_routed_experts"], v["n_activated_experts"], v["n_expert_groups"], v["n_limited_groups"]
        if e <= 0:
            fail(f"{L('n_routed_experts')} must be a positive integer for MoE layers, got {e}")
        if v["moe_inter_dim"] <= 0:
            fail(f"{L('moe_inter_dim')} must be a positive integer for MoE layers, got {v['moe_inter_dim']}")
        if not 0 < k <= e:
            fail(f"{L('n_activated_experts')} ({k}) must be within 1..{L('n_routed_experts')} ({e})")
        if e % g:
            fail(f"{L('n_expert_groups')} ({g}) must divide {L('n_routed_experts')} ({e})")
        if lg > g:
            fail(f"{L('n_limited_groups')} ({lg}) must be within 1..{L('n_expert_groups')} ({g})")
        per_group = e // g
        if g > 1 and per_group < 2 and v["score_func"] == "sigmoid":
            fail(f"{L('n_expert_groups')} ({g}) leaves fewer than 2 experts per group (top-2 group scores need 2)")
        if lg * per_group < k:
            fail(f"{L('n_limited_groups')} ({lg}) keeps fewer experts than {L('n_activated_experts')} ({k})")


# ---- Hugging Face config.json -------------------------------------------------------------------
# config.json's own names for our fields (what error messages say).
HF_NAMES: dict[str, str] = dict(
    vocab_size="vocab_size", dim="hidden_size", inter_dim="intermediate_size", moe_inter_dim="moe_intermediate_size",
    n_layers="num_hidden_layers", n_heads="num_attention_heads", n_dense_layers="first_k_dense_replace",
    n_routed_experts="n_routed_experts", n_shared_experts="n_shared_experts",
    n_activated_experts="num_experts_per_tok", n_expert_groups="n_group", n_limited_groups="topk_group",
    score_func="scoring_func", route_scale="routed_scaling_factor", norm_topk_prob="norm_topk_prob",
    q_lora_rank="q_lora_rank", kv_lora_rank="kv_lora_rank", qk_nope_head_dim="qk_nope_head_dim",
    qk_rope_head_dim="qk_rope_head_dim", v_head_dim="v_head_dim", max_seq_len="max_position_embeddings",
    original_seq_len="rope_scaling.original_max_position_embeddings", rope_theta="rope_theta",
    rope_factor="rope_scaling.factor", beta_fast="rope_scaling.beta_fast", beta_slow="rope_scaling.beta_slow",
    mscale="rope_scaling.mscale_all_dim", norm_eps="rms_norm_eps", n_mtp_layers="num_nextn_predict_layers",
    tie_word_embeddings="tie_word_embeddings", weight_dtype="quantization_config",
    fp8_block="quantization_config.weight_block_size", bos_token_id="bos_token_id", eos_token_id="eos_token_id",
)
# Every config.json field we read, by kind (null means absent for all of them).
HF_KINDS: dict[str, str] = dict(
    vocab_size="pos_int", hidden_size="pos_int", intermediate_size="pos_int", moe_intermediate_size="nonneg_int",
    num_hidden_layers="pos_int", num_attention_heads="pos_int", num_key_value_heads="pos_int",
    n_shared_experts="nonneg_int", n_routed_experts="nonneg_int", routed_scaling_factor="pos_num",
    kv_lora_rank="pos_int", q_lora_rank="nonneg_int", qk_rope_head_dim="pos_int", v_head_dim="pos_int",
    qk_nope_head_dim="pos_int", n_group="nonneg_int", topk_group="nonneg_int", num_experts_per_tok="nonneg_int",
    first_k_dense_replace="nonneg_int", norm_topk_prob="bool", scoring_func="str", hidden_act="str",
    max_position_embeddings="pos_int", rms_norm_eps="pos_num", rope_theta="pos_num", rope_interleave="bool",
    tie_word_embeddings="bool", num_nextn_predict_layers="nonneg_int", num_mtp_layers="nonneg_int",
    bos_token_id="token_id", attention_bias="bool", rope_scaling="object", rope_parameters="object",
    quantization_config="object", dtype="str", torch_dtype="str", model_type="str",
)
HF_ROPE_KINDS: dict[str, str] = dict(
    type="str", rope_type="str", factor="pos_num", original_max_position_embeddings="pos_int", beta_fast="num",
    beta_slow="num", mscale="num", mscale_all_dim="num", rope_theta="pos_num",
)
_MISSING = object()


def _hf_required(hf: dict, key: str, origin: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(f"{origin}: missing field {key!r}")
    return hf[key]


def _check_hf_fields(hf: dict[str, Any], origin: str) -> None:
    """Types and ranges of the raw config.json fields, before anything converts them."""
    for key, kind in HF_KINDS.items():
        if hf.get(key) is not None:
            check_value(hf[key], kind, origin, key)
    eos = hf.get("eos_token_id")
    if eos is not None:
        if isinstance(eos, list):
            if not eos or not all(KINDS["token_id"][0](t) for t in eos):
                raise ConfigError(f"{origin}: eos_token_id must be a token id or a non-empty list of token ids, "
                                  f"got {_show(eos)}")
        else:
            check_value(eos, "token_id", origin, "eos_token_id")
    for rope_key in ("rope_parameters", "rope_scaling"):
        for key, kind in HF_ROPE_KINDS.items():
            if (hf.get(rope_key) or {}).get(key) is not None:
                check_value(hf[rope_key][key], kind, origin, f"{rope_key}.{key}")
    quant = hf.get("quantization_config") or {}
    if quant.get("quant_method") is not None:
        check_value(quant["quant_method"], "str", origin, "quantization_config.quant_method")
    if quant.get("weight_block_size") is not None:
        check_value(quant["weight_block_size"], "block", origin, "quantization_config.weight_block_size")


def _hf_rope(hf: dict[str, Any], origin: str, max_pos: int) -> tuple[float, dict[str, Any]]:
    """(rope_theta, the YaRN fields) from `rope_scaling` or `rope_parameters`."""
    rope_key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = hf.get(rope_key) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", hf.get("rope_theta") or 10000.0))
    if rope_type == "yarn":
        factor = rope.get("factor")
        orig = rope.get("original_max_position_embeddings") or max_pos
        return theta, dict(
            rope_factor=float(factor if factor is not None else max_pos / orig),
            original_seq_len=orig,
            beta_fast=float(rope.get("beta_fast") or 32),
            beta_slow=float(rope.get("beta_slow") or 1),
            # HF scales the softmax by mscale_all_dim; DeepSeek's ModelArgs.mscale is that same number.
            mscale=float(rope.get("mscale_all_dim") or 0.0),
        )
    if rope_type not in ("default", None):
        raise ConfigError(f"{origin}: {rope_key} type {rope_type!r} is not supported (only yarn or default)")
    return theta, dict(rope_factor=1.0, original_seq_len=max_pos)


def from_hf_dict(hf: dict[str, Any], origin: str = "config.json") -> ModelConfig:
    if not isinstance(hf, dict):
        raise ConfigError(f"{origin}: expected a JSON object, got {_show(hf)}")
    model_type = hf.get("model_type")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        raise ConfigError(f"{origin}: model_type {model_type!r} is not deepseek_v3 or deepseek_v2")
    _check_hf_fields(hf, origin)
    req = lambda k: _hf_required(hf, k, origin)  # noqa: E731
    n_layers = req("num_hidden_layers")
    v3 = model_type == "deepseek_v3"
    score_func = hf.get("scoring_func", "sigmoid" if v3 else "softmax")
    max_pos = hf.get("max_position_embeddings") or 4096
    theta, yarn = _hf_rope(hf, origin, max_pos)
    quant = hf.get("quantization_config") or {}
    fp8_block = None
    weight_dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(
        str(hf.get("dtype", hf.get("torch_dtype", "bfloat16"))), "bf16")
    if quant:
        if quant.get("quant_method") != "fp8":
            raise ConfigError(f"{origin}: quantization_config quant_method {quant.get('quant_method')!r} is not supported (only fp8)")
        fp8_block = tuple(quant.get("weight_block_size") or (128, 128))
        weight_dtype = "fp8"
    eos = hf.get("eos_token_id", 1)
    topk = hf.get("num_experts_per_tok")
    d = dict(
        vocab_size=req("vocab_size"), dim=req("hidden_size"), inter_dim=req("intermediate_size"),
        moe_inter_dim=hf.get("moe_intermediate_size") or 0, n_layers=n_layers,
        n_heads=req("num_attention_heads"),
        n_dense_layers=min(hf.get("first_k_dense_replace") or 0, n_layers)
        if hf.get("n_routed_experts") else n_layers,
        n_routed_experts=hf.get("n_routed_experts") or 0,
        n_shared_experts=hf.get("n_shared_experts") or 0,
        n_activated_experts=topk or 0,
        n_expert_groups=hf.get("n_group") or 1,
        n_limited_groups=hf.get("topk_group") or 1,
        score_func=score_func,
        route_scale=float(hf.get("routed_scaling_factor") or 1.0),
        norm_topk_prob=hf.get("norm_topk_prob"),
        q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=req("kv_lora_rank"), qk_nope_head_dim=req("qk_nope_head_dim"),
        qk_rope_head_dim=req("qk_rope_head_dim"), v_head_dim=req("v_head_dim"),
        max_seq_len=max_pos, rope_theta=theta, norm_eps=float(hf.get("rms_norm_eps") or 1e-6),
        n_mtp_layers=hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings") or False),
        weight_dtype=weight_dtype, fp8_block=fp8_block,
        bos_token_id=hf.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,
        extra={"rope_interleave": hf.get("rope_interleave", True), "model_type": model_type},
        **yarn,
    )
    if score_func not in SCORE_FUNCS:
        raise ConfigError(f"{origin}: scoring_func must be one of {', '.join(SCORE_FUNCS)}, got {_show(score_func)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{origin}: hidden_act {hf.get('hidden_act')!r} is not supported (only silu)")
    if hf.get("attention_bias"):
        raise ConfigError(f"{origin}: attention_bias true is not supported")
    heads_kv = hf.get("num_key_value_heads")
    if heads_kv not in (None, d["n_heads"]):
        raise ConfigError(f"{origin}: num_key_value_heads ({heads_kv}) must equal num_attention_heads "
                          f"({d['n_heads']}) for MLA")
    if isinstance(eos, list) and any(t >= d["vocab_size"] for t in eos):
        bad = next(t for t in eos if t >= d["vocab_size"])
        raise ConfigError(f"{origin}: eos_token_id ({bad}) is outside the vocabulary (vocab_size {d['vocab_size']})")
    return _construct(ModelConfig, d, origin, HF_NAMES.__getitem__)


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
MODELARGS_DTYPES = ("bf16", "fp8")


def from_modelargs_dict(args: dict[str, Any], origin: str = "ModelArgs JSON") -> ModelConfig:
    if not isinstance(args, dict):
        raise ConfigError(f"{origin}: expected a JSON object, got {_show(args)}")
    for k in _MODELARGS_REQUIRED:
        if args.get(k) is None:
            raise ConfigError(f"{origin}: missing field {k!r}")
    for k, v in args.items():  # ModelArgs' names are ours: the same checks, before any conversion
        kind = FIELD_KINDS.get(k)
        if kind is not None and not (kind.endswith("?") and v is None):
            check_value(v, kind.rstrip("?"), origin, k)
    dtype = args.get("dtype", "bf16")
    if dtype not in MODELARGS_DTYPES:
        raise ConfigError(f"{origin}: dtype must be one of {', '.join(MODELARGS_DTYPES)}, got {_show(dtype)}")
    if args.get("score_func", "softmax") not in SCORE_FUNCS:
        raise ConfigError(f"{origin}: score_func must be one of {', '.join(SCORE_FUNCS)}, got {_show(args['score_func'])}")
    d = {**_MODELARGS_DEFAULTS, **{k: v for k, v in args.items() if k not in ("dtype", "max_batch_size")}}
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


def check_unambiguous(source: str | Path, names) -> None:
    """A bare name that is both one of `names` (a preset, "demo") and a file or folder here is
    refused: silently taking either would build the wrong model (a preset's random weights for a
    checkpoint named `v3` allocates tens of GB)."""
    if isinstance(source, str) and source in names and Path(source).exists():
        raise ConfigError(f"{source}: both a preset and a folder in this directory; give the folder as ./{source}, "
                          f"or ask for the preset from another directory")


def load_config(source: str | Path) -> ModelConfig:
    """A preset name, a config JSON file (HF or ModelArgs), or a checkpoint directory holding one."""
    check_unambiguous(source, PRESETS)
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
