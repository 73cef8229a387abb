"""Parity with Hugging Face transformers' DeepseekV3ForCausalLM on checkpoints it saves itself.

transformers is used only through its public config / save_pretrained / forward.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dsv3_export.exporter import load_reference  # noqa: E402
from dsv3_export.exporter.checkpoint import Checkpoint  # noqa: E402
from tests.helpers import rel_max_err  # noqa: E402

BASE = dict(vocab_size=160, hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=24, qk_nope_head_dim=12,
            qk_rope_head_dim=8, v_head_dim=12, routed_scaling_factor=2.5, max_position_embeddings=512)
YARN = {"rope_type": "yarn", "type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}

CASES = {
    # YaRN active, q compression, 4 groups keep 2, non-zero correction bias, non-unit norms
    "yarn-qlora-groups": dict(q_lora_rank=32, n_group=4, topk_group=2, rope_parameters=YARN),
    # no q compression, one group, plain RoPE
    "no-qlora-one-group": dict(q_lora_rank=None, n_group=1, topk_group=1),
    # rope stored half-split: our reader permutes the rope rows into interleaved pairs
    "rope-not-interleaved": dict(q_lora_rank=32, n_group=2, topk_group=1, rope_interleave=False, rope_parameters=YARN),
}


def _save_hf_model(path, **overrides):
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(**{**BASE, **overrides})
    model = transformers.DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
        for layer in model.model.layers[cfg.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.copy_(0.1 * torch.randn(cfg.n_routed_experts))
    model.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    hf = _save_hf_model(tmp_path, **CASES[case])
    ours = load_reference(tmp_path)
    assert Checkpoint.open(tmp_path).layout == "hf"
    ids = torch.randint(0, 160, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
        # and decoding with our latent cache lands on the same logits as transformers' full pass
        step = ours(ids[:, -1:], ours(ids[:, :-1]).past).logits
    assert rel_max_err(ref, out.logits) <= 1e-4
    assert rel_max_err(ref[:, -1:], step) <= 1e-4


def test_yarn_only_beyond_pretraining_length(tmp_path):
    """Where the two differ: DeepSeek applies YaRN only when max_seq_len > original_seq_len;
    transformers applies it whenever rope type is yarn. We follow DeepSeek (docs/semantics.md)."""
    short = dict(YARN, original_max_position_embeddings=512)  # == max_position_embeddings
    hf_yarn = _save_hf_model(tmp_path / "yarn", q_lora_rank=32, n_group=1, topk_group=1, rope_parameters=short)
    hf_plain = _save_hf_model(tmp_path / "plain", q_lora_rank=32, n_group=1, topk_group=1)  # same seed, same weights
    ours = load_reference(tmp_path / "yarn")
    assert not ours.cfg.yarn_active
    ids = torch.randint(0, 160, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = ours(ids).logits
        assert rel_max_err(hf_plain(ids).logits, out) <= 1e-4
        assert rel_max_err(hf_yarn(ids).logits, out) > 1e-3
