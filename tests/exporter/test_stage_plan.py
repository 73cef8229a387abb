"""exporter.stage_plan: layer ranges balanced by stored bytes, and the bytes themselves."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import dsv3_export.exporter.names as names
from dsv3_export.core.errors import ExportError
from dsv3_export.exporter.source import open_source
from dsv3_export.exporter.stage_plan import plan_stages, split_layers, weight_bytes


def brute_force(costs, n, first_extra, last_extra):
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), n - 1):
        bounds = (0, *cuts, len(costs))
        worst = max(sum(costs[a:b]) + (first_extra if a == 0 else 0) + (last_extra if b == len(costs) else 0)
                    for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_split_is_contiguous_and_optimal(seed):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(1, 9))
    n = int(rng.integers(1, L + 1))
    costs = rng.integers(1, 100, L).tolist()
    first, last = int(rng.integers(0, 150)), int(rng.integers(0, 150))
    ranges = split_layers(costs, n, first, last)
    assert len(ranges) == n and ranges[0][0] == 0 and ranges[-1][1] == L
    assert all(a < b for a, b in ranges) and all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))
    worst = max(sum(costs[a:b]) + (first if a == 0 else 0) + (last if b == L else 0) for a, b in ranges)
    assert worst == brute_force(costs, n, first, last)


def test_split_refuses_more_stages_than_layers():
    with pytest.raises(ExportError, match=r"--stages 5: the model has only 4 layers"):
        split_layers([1, 1, 1, 1], 5)
    with pytest.raises(ExportError, match="--stages must be a positive integer"):
        split_layers([1, 1], 0)


def test_fp32_bytes_are_four_per_parameter():
    cfg = open_source("small").config
    sizes = weight_bytes(cfg, "fp32")
    stored = {n: s for n, s in names.expected_shapes(cfg).items()
              if not n.endswith((".embed.weight", "shared_head.head.weight"))}  # MTP shares embed and head
    total = sizes["embed"] + sum(sizes["layers"]) + sizes["head"] + sizes["mtp"]
    assert total == 4 * sum(math.prod(s) for s in stored.values())
    assert sizes["embed"] == 4 * cfg.vocab_size * cfg.dim


@pytest.mark.parametrize("precision", ["fp32", "fp8", "int8", "int4-wo"])
@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_stage_bytes_sum_to_the_model(precision, n):
    cfg = open_source("v3").config
    sizes = weight_bytes(cfg, precision)
    stages = plan_stages(cfg, n, precision)
    assert sum(s.weight_bytes for s in stages) == sizes["embed"] + sum(sizes["layers"]) + sizes["head"] + sizes["mtp"]
    assert stages[0].embed and stages[-1].head and [s.first_layer for s in stages][0] == 0
    assert stages[-1].end_layer == cfg.n_layers


def test_v3_fp8_is_deepseeks_size():
    # DeepSeek-V3's FP8 checkpoint: ~690 GB with its MTP layer (the float parts kept in fp32 here).
    cfg = open_source("v3").config
    sizes = weight_bytes(cfg, "fp8")
    total = sizes["embed"] + sum(sizes["layers"]) + sizes["head"] + sizes["mtp"]
    assert 680e9 < total < 700e9
    biggest = max(s.weight_bytes for s in plan_stages(cfg, 8, "fp8"))
    assert biggest < 1.1 * total / 8  # balanced within 10 % of an even split
