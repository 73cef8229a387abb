"""Sizing a model over N GPUs (exporter/deploy_plan.py): the --plan parser and the figures of a plan."""

import pytest

from dsv3_export.core.config import preset
from dsv3_export.core.errors import ExportError
from dsv3_export.exporter.deploy_plan import (
    COLUMNS,
    DEVICES,
    GB,
    GIB,
    WORKSPACE_BYTES,
    Devices,
    activation_bytes,
    parse_plan,
    size_plan,
    summary_lines,
    table_rows,
)
from dsv3_export.exporter.stage_plan import plan_stages, weight_bytes

V3 = preset("v3")
H200 = DEVICES["H200"]


def _model_bytes(cfg, precision):
    w = weight_bytes(cfg, precision)
    return w["embed"] + sum(w["layers"]) + w["head"] + w["mtp"]


@pytest.mark.parametrize("text, want", [
    ("8xH200", Devices(8, "H200", 141 * GB)),
    ("4xh100", Devices(4, "H100", 80 * GB)),
    ("2 x A100-40", Devices(2, "A100-40", 40 * GB)),
    ("8x80GB", Devices(8, "80GB", 80 * GB)),
    ("2x141GiB", Devices(2, "141GiB", 141 * GIB)),
    ("1x1.5TB", Devices(1, "1.5TB", 1500 * GB)),
])
def test_parse_plan_accepts(text, want):
    assert parse_plan(text) == want


@pytest.mark.parametrize("bad", ["", "H200", "8H200", "8xH300", "0xH200", "-1xH200", "8x80", "8x80MB", "ax H200",
                                 "8xH200x2"])
def test_parse_plan_rejects_with_one_line_naming_the_flag(bad):
    with pytest.raises(ExportError) as e:
        parse_plan(bad)
    message = str(e.value)
    assert message.startswith("--plan") and "\n" not in message
    if bad != "0xH200":
        assert all(name in message for name in DEVICES), message


@pytest.mark.parametrize("precision", ["fp8", "fp32"])
def test_stage_bytes_sum_to_the_model(precision):
    plan = size_plan(V3, 8, H200, precision)
    total = sum(s["weight_bytes"] for s in plan["stages"])
    assert total == plan["totals"]["weight_bytes"] == plan["totals"]["model_weight_bytes"]
    assert total == _model_bytes(V3, precision)
    cut = [[s.first_layer, s.end_layer] for s in plan_stages(V3, 8, precision)]
    assert [s["layers"] for s in plan["stages"]] == cut
    assert plan["stages"][0]["embed"] and plan["stages"][-1]["head"] and plan["stages"][-1]["mtp"]


def test_v3_fp8_on_8xh200_fits_with_its_cache():
    plan = size_plan(V3, 8, H200, "fp8")
    assert plan["fits"] and plan["fits_without_cache"] and plan["shortfall_bytes"] == 0
    assert 640e9 < plan["totals"]["weight_bytes"] < 700e9  # 671B at 1 byte, scales and fp32 leftovers
    reserve = int(0.05 * H200) + WORKSPACE_BYTES
    for s in plan["stages"]:
        assert s["reserve_bytes"] == reserve
        assert s["weight_bytes"] + s["activation_bytes"] + s["cache_bytes"] + s["reserve_bytes"] == s["used_bytes"]
        assert s["used_bytes"] <= H200 and s["headroom_bytes"] == H200 - s["used_bytes"] >= 0
        # this stage's own capacity: its free bytes over its bytes per token, to the token
        assert s["free_bytes"] == H200 - s["weight_bytes"] - s["activation_bytes"] - reserve
        assert 0 <= s["free_bytes"] - s["cache_tokens"] * s["cache_bytes_per_token"] < s["cache_bytes_per_token"]
    tot = plan["totals"]
    # the pipeline holds what its tightest stage holds; every stage keeps that many tokens
    assert tot["cache_tokens"] == min(s["cache_tokens"] for s in plan["stages"])
    assert all(s["cache_bytes"] == tot["cache_tokens"] * s["cache_bytes_per_token"] for s in plan["stages"])
    assert tot["cache_bytes_per_token"] == (61 + 1) * 576 * 2  # every layer and the MTP layer, bf16 latents
    assert tot["tokens_per_sequence"] == tot["cache_tokens"] // 32
    assert 2_000_000 < tot["cache_tokens"] < 5_000_000  # ~100k tokens per sequence at batch 32
    assert tot["max_batch_at_model_context"] == tot["cache_tokens"] // 163840


def test_cache_per_token_follows_the_stage_layers():
    plan = size_plan(V3, 8, H200, "fp8", cache_dtype_bytes=1)
    for s in plan["stages"]:
        layers = s["layers"][1] - s["layers"][0] + (1 if s["mtp"] else 0)
        assert s["cache_bytes_per_token"] == layers * V3.latent_dim


def test_v3_fp8_on_one_h200_does_not_fit():
    plan = size_plan(V3, 1, H200, "fp8")
    assert not plan["fits"] and not plan["fits_without_cache"]
    s = plan["stages"][0]
    assert s["cache_tokens"] == 0 and s["headroom_bytes"] < 0
    assert plan["short_stage"] == 0
    assert plan["shortfall_bytes"] == 32 * s["cache_bytes_per_token"] - s["free_bytes"] > 500 * GIB


def test_context_decides_fit_and_batch():
    plan = size_plan(V3, 8, H200, "fp8", batch=16, context=131072)
    assert plan["fits"] and plan["totals"]["max_batch_at_context"] == plan["totals"]["cache_tokens"] // 131072 >= 16
    full = size_plan(V3, 8, H200, "fp8", batch=32, context=163840)
    assert not full["fits"] and full["fits_without_cache"] and full["shortfall_bytes"] > 0
    worst = full["stages"][full["short_stage"]]
    assert full["shortfall_bytes"] == 32 * 163840 * worst["cache_bytes_per_token"] - worst["free_bytes"]


def test_activation_estimate_by_hand():
    last = plan_stages(V3, 8, "fp8")[-1]
    T = 2048
    stream = 4 * T * 7168
    attention = T * (1536 + 128 * (576 + 512 + 128) + 576)
    moe = T * (256 + 8 * (7168 + 3 * 2048) + 3 * 2048)
    logits = 2 * T * 129280  # main head and MTP head
    assert activation_bytes(V3, last, T, mtp=True) == 4 * (stream + max(attention, moe) + logits)
    plan = size_plan(V3, 8, H200, "fp8")
    assert plan["step_tokens"] == 2048 and plan["stages"][-1]["activation_bytes"] == activation_bytes(V3, last, T, True)
    # a decode step of a big batch verifying MTP drafts is two tokens a sequence
    assert size_plan(V3, 8, H200, "fp8", batch=4096)["step_tokens"] == 8192


@pytest.mark.parametrize("kwargs, needle", [
    ({"devices": 62}, "only 61 layers"),
    ({"devices": 0}, "--plan"),
    ({"batch": 0}, "--batch"),
    ({"context": 0}, "--context"),
    ({"precision": "fp9"}, "--precision"),
])
def test_bad_arguments_are_clear_errors(kwargs, needle):
    args = {"devices": 8, "device_bytes": H200, "precision": "fp8"} | kwargs
    with pytest.raises(ExportError, match=needle):
        size_plan(V3, **args)


def test_small_model_without_mtp():
    cfg = preset("v2-lite")  # no MTP layer
    plan = size_plan(cfg, 2, DEVICES["L40S"], "fp32")
    assert plan["fits"] and not plan["mtp"] and not plan["stages"][-1]["mtp"]
    assert plan["totals"]["cache_bytes_per_token"] == cfg.n_layers * cfg.latent_dim * 2
    assert plan["totals"]["weight_bytes"] == _model_bytes(cfg, "fp32")


def test_text_of_a_plan():
    devices = parse_plan("8xH200")
    plan = size_plan(V3, devices.count, devices.memory, "fp8")
    lines = summary_lines(plan, devices, "v3")
    assert lines[-1] == "fits" and "3,278,257 tokens per GPU" in lines[2] and "(= the model's" in lines[1]
    rows = table_rows(plan)
    assert len(rows) == 9 and all(len(r) == len(COLUMNS) for r in rows)
    assert rows[0][1] == "0-9 + embed" and rows[7][1] == "55-60 + head, MTP" and rows[8][:2] == ["all", "61 layers"]
    one = size_plan(V3, 1, devices.memory, "fp8")
    assert summary_lines(one, parse_plan("1xH200"), "v3")[-1].startswith("does not fit: stage 0 is short by")
    assert table_rows(one)[0][-1].startswith("-")  # negative headroom
