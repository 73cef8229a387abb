"""Reading checkpoints: both layouts, shards, FP8, and the errors bad ones must give."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3_export.core.config import preset
from dsv3_export.core.errors import CheckpointError
from dsv3_export.core.fp8 import dequantize_blocks, quantize_blocks
from dsv3_export.exporter import load_reference
from dsv3_export.exporter.checkpoint import Checkpoint
from dsv3_export.exporter.checkpoint_writer import make_checkpoint, write_hf
from dsv3_export.exporter.weights import RandomWeights
from tests.helpers import rel_max_err

IDS = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))


def _logits(source, **kw):
    with torch.no_grad():
        return load_reference(source, **kw)(IDS).logits


def test_hf_checkpoint_equals_preset_weights(tiny_ckpt):
    ckpt = Checkpoint.open(tiny_ckpt)
    assert ckpt.has_mtp and ckpt.layout == "hf"
    assert torch.equal(_logits(tiny_ckpt), _logits("tiny"))


def test_sharded_checkpoint_with_index(tmp_path):
    source = RandomWeights(preset("tiny"), seed=0)
    write_hf(source, tmp_path, shard_bytes=200_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 3 and (tmp_path / "model.safetensors.index.json").is_file()
    assert torch.equal(_logits(tmp_path), _logits("tiny"))


@pytest.mark.parametrize("mp", [1, 2])
def test_deepseek_layout_equals_hf_layout(tmp_path, tiny_ckpt, mp):
    out = make_checkpoint("tiny", tmp_path / f"ds-mp{mp}", layout="deepseek", mp=mp)
    assert sorted(p.name for p in out.glob("*.safetensors")) == [f"model{r}-mp{mp}.safetensors" for r in range(mp)]
    ckpt = Checkpoint.open(out)
    assert ckpt.layout == f"deepseek-mp{mp}" and not ckpt.has_mtp  # convert.py drops the MTP layer
    assert torch.equal(_logits(out), _logits(tiny_ckpt, mtp=False))


def test_fp8_checkpoint_matches_dequantized_twin(tiny_fp8_ckpt, tmp_path):
    ckpt = Checkpoint.open(tiny_fp8_ckpt)
    assert ckpt.config.weight_dtype == "fp8"
    name = "layers.1.attn.wq_b.weight"
    assert ckpt.get(name).dtype == torch.float8_e4m3fn and ckpt.is_fp8(name)
    # the twin: the same weights dequantized by hand and stored as fp32
    twin = tmp_path / "twin"
    shutil.copytree(tiny_fp8_ckpt, twin)
    tensors = load_file(str(twin / "model.safetensors"))
    dense = {}
    for k, v in tensors.items():
        if k.endswith("weight_scale_inv"):
            continue
        scale = tensors.get(k + "_scale_inv")
        dense[k] = dequantize_blocks(v, scale) if scale is not None else v
    save_file(dense, str(twin / "model.safetensors"))
    cfg = json.loads((twin / "config.json").read_text())
    del cfg["quantization_config"]
    (twin / "config.json").write_text(json.dumps(cfg))
    assert rel_max_err(_logits(twin), _logits(tiny_fp8_ckpt)) <= 1e-6


def test_quantize_blocks_partial_blocks():
    w = torch.randn(200, 300)
    q, s = quantize_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3)
    assert ((dequantize_blocks(q, s) - w).norm() / w.norm()).item() < 0.05
    assert torch.allclose(s[1, 2], w[128:, 256:].abs().max() / 448)


def test_lazy_access_does_not_read_everything(tiny_ckpt):
    ckpt = Checkpoint.open(tiny_ckpt)
    assert ckpt.shape("embed.weight") == (512, 64)
    assert ckpt.get("norm.weight").shape == (64,)


def test_fingerprint_changes_with_content(tiny_ckpt, tmp_path):
    a = Checkpoint.open(tiny_ckpt).fingerprint()
    other = make_checkpoint("tiny", tmp_path / "seed1", seed=1)
    assert a == Checkpoint.open(tiny_ckpt).fingerprint() != Checkpoint.open(other).fingerprint()


def test_missing_scale_refused(tiny_fp8_ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_fp8_ckpt, bad)
    t = load_file(str(bad / "model.safetensors"))
    del t["model.layers.1.self_attn.q_b_proj.weight_scale_inv"]
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="q_b_proj|wq_b"):
        Checkpoint.open(bad)
