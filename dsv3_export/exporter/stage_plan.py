"""Pipeline stages: the decoder cut into N contiguous layer ranges balanced by weight bytes
(docs/design.md, "Pipeline stages").

Stage 0 owns the embedding, the last stage the final norm and the head, and the MTP graph rides
with the last stage (it reads the last stage's hidden states). Each stage owns the latent cache of
its layers. The bytes are those the build stores at its precision (quantized weights plus their
scales, the rest in float32), estimated from the config alone, so the same plan serves
`dsv3-export build --stages N` and `dsv3-export inspect --plan` on a model nobody has downloaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dsv3_export.exporter.names as names
from dsv3_export.core.config import ModelConfig
from dsv3_export.core.errors import ExportError
from dsv3_export.exporter.precision_policy import HEAD_BITS, HEAD_BLOCK, Policy, is_head

FLOAT_BYTES = 4  # what a build keeps unquantized is float32


@dataclass(frozen=True)
class Stage:
    """One stage: layers first..end-1, and the weight bytes it holds (its own MTP share included)."""

    index: int
    first_layer: int
    end_layer: int
    weight_bytes: int
    embed: bool  # stage 0: the token embedding
    head: bool  # the last stage: final norm, head (and the MTP graph)

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.end_layer)

    def to_dict(self) -> dict:
        return {"index": self.index, "layers": [self.first_layer, self.end_layer], "weight_bytes": self.weight_bytes,
                "embed": self.embed, "head": self.head}


def tensor_bytes(name: str, shape: tuple[int, ...], policy: Policy) -> int:
    """Stored bytes of one checkpoint tensor at the policy's precision: quantized weights at their bits
    plus one float32 scale per block (or per output row), everything else float32."""
    n = math.prod(shape)
    scheme = policy.scheme
    head = is_head(name) and scheme is not None and scheme.weight != "float8e4m3fn"
    if scheme is None or len(shape) != 2 or not (head or names.is_quantizable(name)) or policy.kept(name):
        return n * FLOAT_BYTES
    rows, cols = shape
    if head:  # the integer precisions' LM head: 8 bits, blocks of HEAD_BLOCK (precision_policy.py)
        return n * HEAD_BITS // 8 + rows * math.ceil(cols / HEAD_BLOCK) * FLOAT_BYTES
    if scheme.weight == "float8e4m3fn":  # square blocks over both axes
        scales = math.ceil(rows / scheme.block) * math.ceil(cols / scheme.block)
    elif scheme.block:
        scales = rows * math.ceil(cols / scheme.block)
    else:
        scales = rows
    return n * scheme.bits // 8 + scales * FLOAT_BYTES


def weight_bytes(cfg: ModelConfig, precision: str = "fp32", keep_fp=None, mtp: bool = True) -> dict:
    """{"embed", "layers" (per decoder layer), "head" (final norm + head), "mtp"}: stored bytes."""
    policy = Policy.make(precision, keep_fp)
    shapes = names.expected_shapes(cfg, mtp=mtp)
    out = {"embed": 0, "layers": [0] * cfg.n_layers, "head": 0, "mtp": 0}
    for name, shape in shapes.items():
        size = tensor_bytes(name, shape, policy)
        if name == "embed.weight":
            out["embed"] += size
        elif name in ("norm.weight", "head.weight"):
            out["head"] += size
        else:
            layer = int(name.split(".")[1])
            if layer < cfg.n_layers:
                out["layers"][layer] += size
            elif not name.endswith((".embed.weight", "shared_head.head.weight")):
                out["mtp"] += size  # MTP's copies of the embedding and head are shared, not stored twice
    return out


def model_bytes(cfg: ModelConfig, precision: str = "fp32", keep_fp=None, mtp: bool = True) -> int:
    """Every stored weight of the model at `precision`: the sum of `weight_bytes`."""
    sizes = weight_bytes(cfg, precision, keep_fp, mtp=mtp)
    return sizes["embed"] + sum(sizes["layers"]) + sizes["head"] + sizes["mtp"]


def split_layers(costs: list[int], n: int, first_extra: int = 0, last_extra: int = 0) -> list[tuple[int, int]]:
    """Cut items 0..L-1 into n non-empty contiguous ranges minimising the largest range's cost; the
    first range also carries `first_extra`, the last `last_extra`. Exact (dynamic programming over
    cut points; L and n are small). Returns [(first, end), ...]."""
    L = len(costs)
    if not isinstance(n, int) or n < 1:
        raise ExportError(f"--stages must be a positive integer, got {n!r}")
    if n > L:
        raise ExportError(f"--stages {n}: the model has only {L} layers (at most one stage per layer)")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(a: int, b: int) -> int:
        return prefix[b] - prefix[a] + (first_extra if a == 0 else 0) + (last_extra if b == L else 0)

    inf = float("inf")
    # best[k][j]: the smallest largest cost cutting items 0..j-1 into k ranges; cut[k][j] its last cut.
    best = [[inf] * (L + 1) for _ in range(n + 1)]
    cut = [[0] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        for j in range(k, L - (n - k) + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], cost(i, j))
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    ranges, j = [], L
    for k in range(n, 0, -1):
        i = cut[k][j]
        ranges.append((i, j))
        j = i
    return ranges[::-1]


def plan_stages(cfg: ModelConfig, n: int, precision: str = "fp32", keep_fp=None, mtp: bool = True) -> list[Stage]:
    """The stage plan of `cfg` cut into n stages at `precision` (see the module docstring)."""
    sizes = weight_bytes(cfg, precision, keep_fp, mtp=mtp)
    last_extra = sizes["head"] + sizes["mtp"]
    ranges = split_layers(sizes["layers"], n, sizes["embed"], last_extra)
    stages = []
    for k, (a, b) in enumerate(ranges):
        total = sum(sizes["layers"][a:b]) + (sizes["embed"] if k == 0 else 0) + (last_extra if k == n - 1 else 0)
        stages.append(Stage(k, a, b, total, embed=k == 0, head=k == n - 1))
    return stages
