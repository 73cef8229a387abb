"""Precision policy: which weights a build quantizes, to what, and which stay high precision.

One `Policy` per build, recorded in the manifest. Names are the graph's canonical parameter names
(the `Transformer` fqn, e.g. `layers.3.attn.wq_b.weight`, `layers.3.ffn.w_gate_up`,
`layers.0.attn.w_uk`, `mtp.0.head.weight`, `embed.weight`); `--keep-fp PATTERN` patterns are
fnmatch patterns over them. docs/precision.md is the user-facing description.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field

from dsv3_export.core.build_options import PRECISIONS
from dsv3_export.core.errors import ExportError
from dsv3_export.core.fp8 import FP8_BLOCK

QUANTIZED = PRECISIONS[1:]
# Kept in the model dtype unless --keep-fp says otherwise: the embedding table (a lookup of one row
# a token, nothing to speed up), the router (its scores pick experts: a flipped pick is a different
# model); for fp8 also the LM heads (they set every logit directly; DeepSeek's own FP8 checkpoint
# keeps them in bf16). The integer precisions store the heads in 8 bits, blocks of HEAD_BLOCK,
# weight-only, whatever the body's precision (llama.cpp's types keep the output matrix at 6-8
# bits too): an fp32 head is 131 MB of the 180 MB an int4-wo token of `small` reads.
# Norms and biases are vectors and never quantized.
HEADS = ("head.weight", "mtp.*.head.weight")
DEFAULT_KEEP_FP = ("embed.weight", "*.gate.weight", *HEADS)
DEFAULT_KEEP_FP_INT = ("embed.weight", "*.gate.weight")
HEAD_BITS, HEAD_BLOCK = 8, 128
INT8_ACT_EPS = 1e-8
# Weight-only block along the input axis. 128, not 32, by measurement on `small` (docs/precision.md):
# 32 costs 1 bit per weight in fp32 scales (int4: 0.156x of fp32 on disk, over the 0.15 target) for
# a gain in logits cosine the thresholds do not need; speed is the same.
WO_BLOCK = 128


@dataclass(frozen=True)
class Scheme:
    """How one precision stores weights and treats activations (per graph form: docs/precision.md)."""

    weight: str  # "float8e4m3fn" | "int8" | "int4"
    bits: int
    block: int  # along the input axis; 0 = one scale per output channel
    act: str | None  # activation quantization in front of each quantized matmul
    moe_block: int  # preferred QMoE / expert block along the input axis (0 = per channel)
    accuracy_level: int  # MatMulNBits / QMoE compute type on ORT CPU (4: int8 dot products)


SCHEMES: dict[str, Scheme] = {
    # fp8: 128x128 weight blocks; activations per token per 128-group (DeepSeek's act_quant).
    "fp8": Scheme("float8e4m3fn", 8, FP8_BLOCK, "fp8-group128", FP8_BLOCK, 0),
    # int8 W8A8: symmetric per-output-channel weights, symmetric dynamic per-token activations.
    # Experts on ORT go through QMoE, whose 8-bit kernel is 3x faster with 128-blocks (int8
    # activations inside) than per channel (fp32 activations): measured, docs/precision.md.
    "int8": Scheme("int8", 8, 0, "int8-token", 128, 4),
    "int8-wo": Scheme("int8", 8, WO_BLOCK, None, 128, 4),
    "int4-wo": Scheme("int4", 4, WO_BLOCK, None, 128, 4),
}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ExportError(f"--precision {precision!r} is not supported (choose from {', '.join(PRECISIONS)})")
    return precision


def is_head(fqn: str) -> bool:
    """An LM head: the main model's or an MTP layer's (HEADS)."""
    return any(fnmatch.fnmatchcase(fqn, p) for p in HEADS)


def default_keep_fp(precision: str = "fp8") -> tuple[str, ...]:
    """What a precision keeps unless --keep-fp says otherwise (DEFAULT_KEEP_FP: fp8 keeps the heads,
    the integer precisions quantize them to 8 bits)."""
    return DEFAULT_KEEP_FP if precision in ("fp32", "fp8") else DEFAULT_KEEP_FP_INT


def expand_keep_fp(patterns, precision: str = "fp8") -> tuple[str, ...]:
    """--keep-fp values -> patterns. None or empty: the precision's defaults; "default" expands to
    them, so `--keep-fp default --keep-fp 'layers.0.*'` adds one; "none" (alone) keeps nothing,
    embeddings and heads included. Commas separate several patterns in one value."""
    defaults = default_keep_fp(precision)
    if not patterns:
        return defaults
    parts = [s.strip() for p in patterns for s in str(p).split(",") if s.strip()]
    if "none" in parts:
        if len(parts) > 1:
            raise ExportError("--keep-fp none cannot be combined with other patterns")
        return ()
    out: list[str] = []
    for part in parts:
        out.extend(defaults if part == "default" else [part])
    return tuple(dict.fromkeys(out))


@dataclass
class Policy:
    precision: str
    keep_fp: tuple[str, ...] = DEFAULT_KEEP_FP
    # filled by the quantize pass: fqn -> what happened to it (format or "kept" or "float: why")
    decisions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        check_precision(self.precision)

    @classmethod
    def make(cls, precision: str, keep_fp=None) -> "Policy":
        return cls(check_precision(precision), expand_keep_fp(keep_fp, precision))

    @property
    def scheme(self) -> Scheme | None:
        return SCHEMES.get(self.precision)

    def kept(self, fqn: str) -> bool:
        return any(fnmatch.fnmatchcase(fqn, p) for p in self.keep_fp)

    def check_patterns(self, fqns) -> None:
        """Every --keep-fp pattern the user gave (not the defaults, which name weights a model may
        lack: the MTP head) matches at least one of the graph's weight names `fqns`, else one
        ExportError naming the pattern: a typo must not pass silently."""
        fqns = list(fqns)
        for p in self.keep_fp:
            if p not in DEFAULT_KEEP_FP and not any(fnmatch.fnmatchcase(f, p) for f in fqns):
                raise ExportError(f"--keep-fp {p!r} matches no weight of this model (names are the graph's "
                                  "parameter names, e.g. 'layers.3.attn.wq_b.weight'; docs/precision.md)")

    def to_dict(self) -> dict:
        scheme = self.scheme
        counts: dict[str, int] = {}
        for d in self.decisions.values():
            counts[d] = counts.get(d, 0) + 1
        return {"precision": self.precision, "keep_fp": list(self.keep_fp),
                "scheme": asdict(scheme) if scheme else None, "counts": counts,
                "tensors": dict(sorted(self.decisions.items()))}
