"""One place that validates config fields (issue 16, item 5): config.json (Hugging Face names),
DeepSeek's ModelArgs JSON and a build manifest's config, each error one line naming the file and
the field as that file spells it."""

from __future__ import annotations

import json

import pytest

from dsv3_export.core.config import ModelConfig, from_hf_dict, from_modelargs_dict, preset, to_hf_dict
from dsv3_export.core.errors import ConfigError, ExportError
from dsv3_export.exporter import open_source
from dsv3_export.exporter.checkpoint_writer import make_checkpoint, modelargs_dict
from tests.hardening.common import DELETE, copy_ckpt, edit_config, inspect
from tests.helpers import assert_clean_error

HF_CASES = [
    ({"num_hidden_layers": "three"}, 'num_hidden_layers must be a positive integer, got "three"'),
    ({"hidden_size": True}, "hidden_size must be a positive integer, got true"),
    ({"hidden_size": 64.0}, "hidden_size must be a positive integer, got 64.0"),
    ({"rope_scaling": "yarn"}, 'rope_scaling must be an object, got "yarn"'),
    ({"rms_norm_eps": "tiny"}, 'rms_norm_eps must be a positive number, got "tiny"'),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive number, got 0"),
    ({"eos_token_id": []}, "eos_token_id must be a token id or a non-empty list of token ids, got []"),
    ({"eos_token_id": 512}, "eos_token_id (512) is outside the vocabulary (vocab_size 512)"),
    ({"eos_token_id": [1, 700]}, "eos_token_id (700) is outside the vocabulary (vocab_size 512)"),
    ({"bos_token_id": -1}, "bos_token_id must be a token id (an integer >= 0), got -1"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok (9) must be within 1..n_routed_experts (8)"),
    ({"n_group": 3}, "n_group (3) must divide n_routed_experts (8)"),
    ({"num_experts_per_tok": 5}, "topk_group (2) keeps fewer experts than num_experts_per_tok (5)"),
    ({"qk_nope_head_dim": 0}, "qk_nope_head_dim must be a positive integer, got 0"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim must be even (RoPE rotates pairs), got 7"),
    ({"kv_lora_rank": None}, "missing field 'kv_lora_rank'"),
    ({"vocab_size": DELETE}, "missing field 'vocab_size'"),
    ({"rope_scaling": {"type": "yarn", "factor": "40"}}, 'rope_scaling.factor must be a positive number, got "40"'),
    ({"rope_scaling": {"type": "ntk", "factor": 2}}, "rope_scaling type 'ntk' is not supported"),
    ({"quantization_config": [1]}, "quantization_config must be an object, got [1]"),
    ({"tie_word_embeddings": "no"}, 'tie_word_embeddings must be true or false, got "no"'),
    ({"num_key_value_heads": 2}, "num_key_value_heads (2) must equal num_attention_heads (4) for MLA"),
    ({"max_position_embeddings": -5}, "max_position_embeddings must be a positive integer, got -5"),
    ({"routed_scaling_factor": float("nan")}, "routed_scaling_factor must be a positive number, got NaN"),
]


@pytest.mark.parametrize("change, message", HF_CASES, ids=[m.split(" ")[0] for _, m in HF_CASES])
def test_hf_config_field_errors(change, message):
    hf = to_hf_dict(preset("tiny"))
    for k, v in change.items():
        hf.pop(k) if v is DELETE else hf.__setitem__(k, v)
    with pytest.raises(ConfigError) as e:
        from_hf_dict(hf, "ckpt/config.json")
    assert str(e.value) == f"ckpt/config.json: {message}" or str(e.value).startswith(f"ckpt/config.json: {message}")


@pytest.mark.parametrize("change, message", HF_CASES[:6])
def test_hf_config_field_errors_through_the_cli(tiny_ckpt, tmp_path, change, message):
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    edit_config(d, **change)
    assert_clean_error(inspect(d), f"{d / 'config.json'}: {message}")
    with pytest.raises(ConfigError, match="config.json: "):
        open_source(d)


MODELARGS_CASES = [
    ({"n_layers": "3"}, 'n_layers must be a positive integer, got "3"'),
    ({"dim": True}, "dim must be a positive integer, got true"),
    ({"n_activated_experts": 9}, "n_activated_experts (9) must be within 1..n_routed_experts (8)"),
    ({"rope_theta": "big"}, 'rope_theta must be a positive number, got "big"'),
    ({"dtype": "int4"}, 'dtype must be one of bf16, fp8, got "int4"'),
    ({"score_func": 3}, "score_func must be a string, got 3"),
    ({"qk_rope_head_dim": 0}, "qk_rope_head_dim must be a positive integer, got 0"),
]


@pytest.mark.parametrize("change, message", MODELARGS_CASES)
def test_modelargs_field_errors(change, message):
    args = {**modelargs_dict(preset("tiny")), **change}
    with pytest.raises(ConfigError) as e:
        from_modelargs_dict(args, "ds/config.json")
    assert str(e.value) == f"ds/config.json: {message}"


def test_modelargs_field_error_through_the_cli(tmp_path):
    d = make_checkpoint("tiny", tmp_path / "ds", layout="deepseek")
    args = json.loads((d / "config.json").read_text())
    args["n_heads"] = "four"
    (d / "config.json").write_text(json.dumps(args))
    assert_clean_error(inspect(d), f"{d / 'config.json'}: n_heads must be a positive integer, got \"four\"")


@pytest.mark.parametrize("config, message", [
    ([1, 2], "manifest.json: config must be an object, got [1, 2]"),
    ({**preset("tiny").to_dict(), "n_layers": "x"}, 'manifest.json: config.n_layers must be a positive integer, got "x"'),
    ({**preset("tiny").to_dict(), "fp8_block": 128}, "manifest.json: config.fp8_block must be two positive integers, got 128"),
    ({**preset("tiny").to_dict(), "eos_token_id": 10**6}, "manifest.json: config.eos_token_id (1000000) is outside"),
    ({k: v for k, v in preset("tiny").to_dict().items() if k != "dim"}, "manifest.json: missing field 'config.dim'"),
])
def test_manifest_config_errors_name_manifest(config, message):
    with pytest.raises(ExportError) as e:
        ModelConfig.from_dict(config)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("name", ["tiny", "demo", "v2-lite", "v3"])
def test_every_reader_still_takes_good_configs(name):
    cfg = preset(name)
    assert from_hf_dict(to_hf_dict(cfg)) == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert from_modelargs_dict(modelargs_dict(cfg)).dim == cfg.dim
