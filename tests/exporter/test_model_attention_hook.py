"""Transformer.training_form(): the per-instance hook tools/train_demo.py trains under (plain-torch
ops, fused naive attention without a cache) is the same function, leaves the default form and other
instances untouched, and patches nothing in exporter.model."""

import pytest
import torch

import dsv3_export.exporter.model as model_module
from dsv3_export.exporter import load_reference
from dsv3_export.exporter.model import MLA, MoE
from tests.helpers import rel_max_err


@pytest.mark.parametrize("mla", ["absorbed", "naive"])
def test_training_form_matches_and_restores(mla):
    model = load_reference("tiny", mla=mla)
    other = load_reference("tiny", mla=mla)
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(3))
    globals_before = dict(vars(model_module))
    forward_before = MLA.forward, MoE.forward
    with torch.no_grad():
        ref = model(ids)
        with model.training_form() as m:
            assert m is model
            assert all(x.training_form for x in model.modules() if isinstance(x, (MLA, MoE)))
            assert not any(x.training_form for x in other.modules() if isinstance(x, (MLA, MoE)))
            got = model(ids)
            other_out = other(ids)  # another instance keeps the inference form
        after = model(ids)
    assert rel_max_err(ref.logits, got.logits) <= 1e-5
    assert torch.equal(other_out.logits, ref.logits) and torch.equal(after.logits, ref.logits)
    assert not any(x.training_form for x in model.modules() if isinstance(x, (MLA, MoE)))
    assert dict(vars(model_module)) == globals_before and (MLA.forward, MoE.forward) == forward_before


def test_training_form_is_differentiable_and_restores_on_error():
    model = load_reference("tiny", mla="naive")
    for p in model.parameters():
        p.requires_grad_(True)
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(4))
    with pytest.raises(RuntimeError, match="boom"), model.training_form():
        model(ids).logits.sum().backward()
        raise RuntimeError("boom")
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    assert moe.w_gate_up.grad is not None and moe.w_gate_up.grad.abs().sum() > 0  # through the plain dispatch
    assert not any(x.training_form for x in model.modules() if isinstance(x, (MLA, MoE)))
