"""Garbage without a word at read time (issue 16, item 4, and the smaller item 7 cases): non-finite
values, non-float dtypes, FP8 without its scale, stray scales, duplicated or misplaced tensors,
model-parallel shards that disagree, --keep-fp patterns that match nothing."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3_export.core.config import preset
from dsv3_export.core.errors import CheckpointError, ExportError
from dsv3_export.exporter import load_reference, open_source
from dsv3_export.exporter.checkpoint import Checkpoint
from dsv3_export.exporter.checkpoint_writer import make_checkpoint, write_hf
from dsv3_export.exporter.precision_policy import Policy
from dsv3_export.exporter.weights import RandomWeights
from tests.hardening.common import copy_ckpt, edit_tensors, inspect
from tests.helpers import assert_clean_error

Q_B = "model.layers.1.self_attn.q_b_proj.weight"
NORM = "model.layers.2.input_layernorm.weight"


def _poke(value, name=Q_B, where=(0, 3)):
    def fn(t):
        t[name] = t[name].clone()
        t[name][where] = value
    return fn


@pytest.mark.parametrize("name, where, value", [
    (Q_B, (0, 3), math.nan),
    (Q_B, (5, 1), math.inf),
    (NORM, (7,), -math.inf),
    ("model.embed_tokens.weight", (511, 63), math.nan),
])
def test_non_finite_weight_refused_when_read(tiny_ckpt, tmp_path, name, where, value):
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    edit_tensors(d, _poke(value, name, where))
    ckpt = Checkpoint.open(d)  # opening reads headers only
    with pytest.raises(CheckpointError, match="NaN or Inf") as e:
        load_reference(d)
    assert name in str(e.value) and "model.safetensors" in str(e.value) and "\n" not in str(e.value)
    ckpt.get("layers.0.attn_norm.weight")  # the other tensors still read


def test_non_finite_fp8_weight_and_scale_refused(tiny_fp8_ckpt, tmp_path):
    d = copy_ckpt(tiny_fp8_ckpt, tmp_path / "c")

    def fn(t):
        w = t[Q_B].clone().view(torch.uint8)
        w[0, 0] = 0x7F  # E4M3 NaN
        t[Q_B] = w.view(torch.float8_e4m3fn)
        s = Q_B + "_scale_inv"
        t["model.layers.2.self_attn.kv_b_proj.weight_scale_inv"] = torch.full_like(
            t["model.layers.2.self_attn.kv_b_proj.weight_scale_inv"], math.inf)
        assert s in t
    edit_tensors(d, fn)
    ckpt = open_source(d)
    with pytest.raises(CheckpointError, match=f"{Q_B}' holds 1 NaN or Inf"):
        ckpt.get("layers.1.attn.wq_b.weight")
    with pytest.raises(CheckpointError, match="kv_b_proj.weight_scale_inv' holds"):
        ckpt.dequantized("layers.2.attn.wkv_b.weight")


@pytest.mark.parametrize("make, dtype_name", [
    (lambda w: w.to(torch.int32), "I32"),
    (lambda w: w > 0, "BOOL"),
    (lambda w: w.to(torch.int8), "I8"),
    (lambda w: w.to(torch.float8_e4m3fn), "F8_E4M3"),  # FP8 without its scale, in a float checkpoint
])
def test_non_float_or_unscaled_fp8_weight_refused(tiny_ckpt, tmp_path, make, dtype_name):
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")

    def fn(t):
        t[Q_B] = make(t[Q_B]).contiguous()
    edit_tensors(d, fn)
    with pytest.raises(CheckpointError, match=Q_B) as e:
        open_source(d)
    assert dtype_name in str(e.value) and "not cast" in str(e.value)
    assert_clean_error(inspect(d), Q_B, dtype_name)


def test_scale_beside_a_float_weight_refused(tiny_ckpt, tmp_path):
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")

    def fn(t):
        t[Q_B + "_scale_inv"] = torch.ones(1, 1)
    edit_tensors(d, fn)
    assert_clean_error(inspect(d), Q_B + "_scale_inv", "not FP8")


def test_stray_scale_refused_like_stray_weights(tiny_fp8_ckpt, tmp_path):
    d = copy_ckpt(tiny_fp8_ckpt, tmp_path / "c")
    stray = "model.layers.1.self_attn.extra_proj.weight_scale_inv"

    def fn(t):
        t[stray] = torch.ones(1, 1)
    edit_tensors(d, fn)
    assert_clean_error(inspect(d), stray, "not part of the configured model")


def test_fp8_weight_of_a_checkpoint_missing_its_scale(tiny_fp8_ckpt, tmp_path):
    d = copy_ckpt(tiny_fp8_ckpt, tmp_path / "c")
    edit_tensors(d, lambda t: t.pop(Q_B + "_scale_inv"))
    assert_clean_error(inspect(d), Q_B, "no scale tensor")


@pytest.fixture
def shards(tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    write_hf(RandomWeights(preset("tiny"), seed=0), d, shard_bytes=200_000)
    return d


def test_same_tensor_in_two_shards_without_index(shards):
    index = json.loads((shards / "model.safetensors.index.json").read_text())["weight_map"]
    (shards / "model.safetensors.index.json").unlink()
    first = shards / index["model.embed_tokens.weight"]
    other = next(f for f in sorted(shards.glob("model-*.safetensors")) if f != first)
    t = load_file(str(other))
    t["model.embed_tokens.weight"] = load_file(str(first))["model.embed_tokens.weight"]
    save_file(t, str(other))
    with pytest.raises(CheckpointError, match="'model.embed_tokens.weight' is also in") as e:
        open_source(shards)
    assert first.name in str(e.value) and other.name in str(e.value)
    assert_clean_error(inspect(shards), first.name, other.name)


def test_index_maps_a_tensor_to_the_wrong_shard(shards):
    path = shards / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    right = index["weight_map"]["model.norm.weight"]
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != right)
    index["weight_map"]["model.norm.weight"] = wrong
    path.write_text(json.dumps(index))
    msg = f"model.safetensors.index.json: maps tensor 'model.norm.weight' to {wrong}, which does not hold it"
    with pytest.raises(CheckpointError, match=msg):
        open_source(shards)
    assert_clean_error(inspect(shards), msg)


@pytest.mark.parametrize("tensor, shape", [
    ("layers.1.attn.wq_b.weight", (48, 40)),  # split along dim 0: the other dims must agree
    ("layers.1.attn_norm.weight", (60,)),  # replicated: every copy the same shape
])
def test_deepseek_shards_that_disagree_fail_at_open(tmp_path, tensor, shape):
    d = make_checkpoint("tiny", tmp_path / "ds", layout="deepseek", mp=2)
    edit_tensors(d, lambda t: t.__setitem__(tensor, torch.zeros(shape)), file="model1-mp2.safetensors")
    with pytest.raises(CheckpointError, match=f"tensor '{tensor}' has shape") as e:
        open_source(d)
    assert "model0-mp2.safetensors" in str(e.value) and "model1-mp2.safetensors" in str(e.value)
    assert_clean_error(inspect(d), tensor, "model1-mp2.safetensors")


def _param_names():
    from dsv3_export.exporter.export import meta_model

    return [n for n, _ in meta_model(preset("tiny"), mtp=False).named_parameters()]


@pytest.mark.parametrize("patterns, bad", [
    (["layers.0.atn.*"], "layers.0.atn.*"),
    (["default", "mtp.9.*"], "mtp.9.*"),
    (["layers.*.ffn.w_gate_up", "nothing"], "nothing"),
])
def test_keep_fp_pattern_matching_nothing(patterns, bad):
    policy = Policy.make("int8", patterns)
    with pytest.raises(ExportError, match=f"--keep-fp '{bad}' matches no weight"):
        policy.check_patterns(_param_names())


def test_keep_fp_patterns_that_match_pass():
    Policy.make("int8", None).check_patterns(_param_names())  # defaults: never an error (no MTP here)
    Policy.make("int8", ["default", "layers.0.*"]).check_patterns(_param_names())
