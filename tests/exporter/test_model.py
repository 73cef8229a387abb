"""The reference model's own invariants: absorbed == naive MLA, cached decode == recompute, routing."""

import pytest
import torch

from dsv3_export.core.config import preset
from dsv3_export.exporter import load_reference
from dsv3_export.exporter.model import Gate
from tests.helpers import rel_max_err


def _decode_chain(model, ids, steps):
    """Prefill, then `steps` single-token steps feeding the cache; logits of every step."""
    out = model(ids)
    logits = [out.logits]
    tok = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(tok, out.past)
        logits.append(out.logits)
        tok = out.logits[:, -1:].argmax(-1)
    return logits


def test_absorbed_equals_naive_float64():
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(1))
    absorbed = load_reference("tiny", dtype=torch.float64, mla="absorbed")
    naive = load_reference("tiny", dtype=torch.float64, mla="naive")
    with torch.no_grad():
        a, n = _decode_chain(absorbed, ids, 16), _decode_chain(naive, ids, 16)
    assert len(a) == 17
    for la, ln in zip(a, n):
        assert rel_max_err(ln, la) <= 1e-10


@pytest.mark.parametrize("mla", ["absorbed", "naive"])
def test_cached_decode_equals_recompute(mla):
    model = load_reference("tiny", mla=mla)
    ids = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        new = model.generate_greedy(ids, 10)
        full = model(torch.cat([ids, new], dim=1)).logits
        out = model(ids)
        step_logits = [out.logits[:, -1]]
        for t in range(new.shape[1] - 1):
            out = model(new[:, t:t + 1], out.past)
            step_logits.append(out.logits[:, -1])
    recomputed = full[:, ids.shape[1] - 1:-1]
    assert rel_max_err(recomputed, torch.stack(step_logits, 1)) <= 1e-5
    assert torch.equal(full[:, ids.shape[1] - 1:-1].argmax(-1), new)


def test_multi_token_step_equals_single_steps():
    """Speculative verification feeds two tokens at once: same logits as two decode steps."""
    model = load_reference("tiny")
    ids = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        past = model(ids).past
        two = model(torch.tensor([[7, 9]]), past)
        one = model(torch.tensor([[7]]), past)
        one2 = model(torch.tensor([[9]]), one.past)
    assert rel_max_err(two.logits, torch.cat([one.logits, one2.logits], 1)) <= 1e-5
    assert all(p.shape == (1, 7, 40) for p in two.past)


def test_latent_cache_width_and_mtp_forward():
    model = load_reference("tiny")
    cfg = model.cfg
    ids = torch.randint(0, 512, (1, 4))
    with torch.no_grad():
        out = model(ids)
        logits, cache = model.mtp_forward(ids[:, 1:], out.hidden_states[:, :-1])
        logits2, cache2 = model.mtp_forward(ids[:, -1:], out.hidden_states[:, -1:], cache)
    assert out.past[0].shape[-1] == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert logits.shape == (1, 3, cfg.vocab_size) and cache.shape == (1, 3, 40) and cache2.shape == (1, 4, 40)


def test_bf16_close_to_fp32():
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        f32 = load_reference("tiny")(ids).hidden_states
        b16 = load_reference("tiny", dtype=torch.bfloat16)(ids).hidden_states.float()
    cos = torch.nn.functional.cosine_similarity(f32.flatten(), b16.flatten(), dim=0)
    assert cos >= 0.99


def test_dropped_groups_never_selected_even_with_negative_scores():
    """DeepSeek fills dropped groups with -inf: with a strongly negative bias, a 0 fill would let
    dropped experts win (the semantics transformers used before it switched to -inf)."""
    cfg = preset("tiny")  # 8 experts, 4 groups of 2, keep 2 groups, top-2
    gate = Gate(cfg, has_bias=True)
    torch.manual_seed(0)
    gate.weight.copy_(torch.randn_like(gate.weight))
    gate.bias.fill_(-5.0)  # every biased score is negative
    x = torch.randn(64, cfg.dim)
    weights, idx = gate(x)
    scores = torch.sigmoid(x @ gate.weight.T) - 5.0
    group_scores = scores.view(64, 4, 2).topk(2, -1)[0].sum(-1)
    kept = group_scores.topk(2, -1)[1]
    assert all(set((idx[n] // 2).tolist()) <= set(kept[n].tolist()) for n in range(64))
    # weights: the unbiased scores of the chosen experts, normalised, times route_scale
    chosen = torch.sigmoid(x @ gate.weight.T).gather(1, idx)
    assert torch.allclose(weights, chosen / chosen.sum(-1, keepdim=True) * cfg.route_scale, atol=1e-6)


def test_softmax_routing_without_bias_uses_group_max():
    cfg = preset("tiny").replace(score_func="softmax", norm_topk_prob=False, route_scale=1.0)
    gate = Gate(cfg, has_bias=False)
    torch.manual_seed(1)
    gate.weight.copy_(torch.randn_like(gate.weight))
    x = torch.randn(32, cfg.dim)
    weights, idx = gate(x)
    probs = (x @ gate.weight.T).softmax(-1)
    kept = probs.view(32, 4, 2).amax(-1).topk(2, -1)[1]
    masked = probs.view(32, 4, 2).clone()
    for n in range(32):
        for g in range(4):
            if g not in kept[n]:
                masked[n, g] = float("-inf")
    expect = masked.flatten(1).topk(2, -1)[1]
    assert torch.equal(idx.sort(-1)[0], expect.sort(-1)[0])
    assert torch.allclose(weights, probs.gather(1, idx), atol=1e-7)  # softmax: not renormalised
