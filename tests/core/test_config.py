import json

import pytest

from dsv3_export.core.config import (
    PRESETS,
    ModelConfig,
    from_hf_dict,
    from_modelargs_dict,
    load_config,
    preset,
    to_hf_dict,
)
from dsv3_export.core.errors import ConfigError
from dsv3_export.exporter.checkpoint_writer import modelargs_dict


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_valid_and_round_trip_through_both_formats(name):
    cfg = preset(name)
    back = from_hf_dict(to_hf_dict(cfg)).to_dict()
    assert back == cfg.to_dict()
    args = from_modelargs_dict(modelargs_dict(cfg)).to_dict()
    for key in ("dim", "n_layers", "n_heads", "n_routed_experts", "q_lora_rank", "rope_factor", "score_func", "mscale"):
        assert args[key] == cfg.to_dict()[key]


def test_v3_shape_and_latent_width():
    cfg = preset("v3")
    assert cfg.latent_dim == 576
    assert cfg.naive_cache_dim == 40960
    assert cfg.weight_dtype == "fp8" and cfg.fp8_block == (128, 128)
    assert cfg.yarn_active


HF_V3 = {
    "model_type": "deepseek_v3", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
    "moe_intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "n_routed_experts": 8,
    "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 2,
    "q_lora_rank": None, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "max_position_embeddings": 4096,
    "num_nextn_predict_layers": 1, "scoring_func": "sigmoid",
    "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
}


@pytest.mark.parametrize("rope_key", ["rope_scaling", "rope_parameters"])
def test_hf_config_yarn_fields(rope_key):
    hf = dict(HF_V3, **{rope_key: {"type": "yarn", "rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 1024,
                                   "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
                                   "rope_theta": 50000.0}})
    cfg = from_hf_dict(hf)
    assert cfg.q_lora_rank == 0 and cfg.n_dense_layers == 2 and cfg.n_mtp_layers == 1
    assert (cfg.rope_factor, cfg.original_seq_len, cfg.mscale) == (40.0, 1024, 0.707)
    assert cfg.weight_dtype == "fp8" and cfg.fp8_block == (128, 128)
    assert cfg.yarn_active and cfg.softmax_scale == pytest.approx(24**-0.5 * (0.1 * 0.707 * __import__("math").log(40) + 1) ** 2)
    if rope_key == "rope_parameters":
        assert cfg.rope_theta == 50000.0


def test_modelargs_json_file(tmp_path):
    args = {"vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61,
            "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
            "n_activated_experts": 8, "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5,
            "score_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8"}
    (tmp_path / "config_671B.json").write_text(json.dumps(args))
    cfg = load_config(tmp_path / "config_671B.json")
    # ModelArgs leaves max_seq_len at its default, 4096 * 4.
    assert cfg == preset("v3").replace(n_mtp_layers=0, max_seq_len=16384)


@pytest.mark.parametrize("change, field", [
    ({"n_heads": 0}, "n_heads"),
    ({"n_routed_experts": 10, "n_expert_groups": 4}, "n_expert_groups"),
    ({"score_func": "relu"}, "score_func"),
    ({"n_activated_experts": 9}, "n_activated_experts"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ({"n_dense_layers": 9}, "n_dense_layers"),
])
def test_invalid_config_names_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{**PRESETS["tiny"], **change})


def test_missing_field_is_named():
    hf = dict(HF_V3)
    del hf["kv_lora_rank"]
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        from_hf_dict(hf)
    with pytest.raises(ConfigError, match="'dim'"):
        from_modelargs_dict({"vocab_size": 10, "n_layers": 2, "n_heads": 2})


def test_unknown_preset_and_bad_model_type():
    with pytest.raises(ConfigError, match="unknown preset|not a preset"):
        load_config("huge")
    with pytest.raises(ConfigError, match="model_type"):
        from_hf_dict({**HF_V3, "model_type": "llama"})
