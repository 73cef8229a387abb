"""The precision policy (exporter/precision.py): precisions, --keep-fp patterns, what the manifest records."""

import pytest

from dsv3_export.exporter import ExportError
from dsv3_export.exporter.precision_policy import (
    DEFAULT_KEEP_FP,
    DEFAULT_KEEP_FP_INT,
    PRECISIONS,
    SCHEMES,
    Policy,
    check_precision,
    expand_keep_fp,
)


def test_precisions_and_schemes():
    assert PRECISIONS == ("fp32", "fp8", "int8", "int8-wo", "int4-wo")
    assert set(SCHEMES) == set(PRECISIONS) - {"fp32"}
    assert SCHEMES["fp8"].block == 128 and SCHEMES["fp8"].act == "fp8-group128"
    assert SCHEMES["int8"].block == 0 and SCHEMES["int8"].act == "int8-token"  # per channel, W8A8
    assert SCHEMES["int4-wo"].bits == 4 and SCHEMES["int4-wo"].act is None
    assert Policy.make("fp32").scheme is None


@pytest.mark.parametrize("bad", ["fp7", "int4", "FP8", ""])
def test_unknown_precision_is_a_clear_error(bad):
    with pytest.raises(ExportError, match=r"--precision .* not supported .*fp32, fp8, int8, int8-wo, int4-wo"):
        check_precision(bad)
    with pytest.raises(ExportError, match="--precision"):
        Policy.make(bad)


def test_keep_fp_patterns():
    assert expand_keep_fp(None) == expand_keep_fp([]) == DEFAULT_KEEP_FP
    assert expand_keep_fp(["none"]) == ()
    assert expand_keep_fp(["layers.0.*"]) == ("layers.0.*",)
    assert expand_keep_fp(["default", "layers.0.*,mtp.*"]) == DEFAULT_KEEP_FP + ("layers.0.*", "mtp.*")
    # the integer precisions' defaults leave the heads to be stored in 8 bits
    assert expand_keep_fp(None, "int4-wo") == DEFAULT_KEEP_FP_INT == ("embed.weight", "*.gate.weight")
    assert expand_keep_fp(["default", "head.weight"], "int8") == DEFAULT_KEEP_FP_INT + ("head.weight",)
    with pytest.raises(ExportError, match="none"):
        expand_keep_fp(["none", "layers.0.*"])


def test_default_policy_keeps_embeddings_router_and_fp8_heads():
    p = Policy.make("int8")
    for kept in ("embed.weight", "layers.3.ffn.gate.weight"):
        assert p.kept(kept), kept
    assert not p.kept("head.weight") and not p.kept("mtp.0.head.weight")  # 8 bits (quantize.py)
    assert Policy.make("fp8").kept("head.weight") and Policy.make("fp8").kept("mtp.0.head.weight")
    for quantized in ("layers.3.attn.wq_b.weight", "layers.3.ffn.w_gate_up", "layers.0.ffn.w2.weight",
                      "mtp.0.eh_proj.weight", "mtp.0.block.ffn.w_down", "layers.1.ffn.shared_experts.w1.weight"):
        assert not p.kept(quantized), quantized
    assert not Policy.make("int8", ["none"]).kept("embed.weight")
    assert Policy.make("int8", ["layers.0.*"]).kept("layers.0.attn.wo.weight")


def test_manifest_record():
    p = Policy.make("int4-wo", ["default", "layers.0.*"])
    p.decisions.update({"layers.0.attn.wo.weight": "kept", "layers.1.attn.wo.weight": "int4 weight-only, blocks of 128"})
    d = p.to_dict()
    assert d["precision"] == "int4-wo" and d["keep_fp"][-1] == "layers.0.*"
    assert d["scheme"]["bits"] == 4 and d["scheme"]["block"] == 128
    assert d["counts"] == {"kept": 1, "int4 weight-only, blocks of 128": 1}
    assert d["tensors"]["layers.0.attn.wo.weight"] == "kept"
