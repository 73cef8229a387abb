import numpy as np
import onnx_ir as ir
import pytest

from dsv3_export.core.errors import CheckpointError
from dsv3_export.exporter import open_source
from dsv3_export.exporter.passes.attach_weights import attach_weights


class CountingSource:
    """A weight source that records what was read (to prove attachment is lazy)."""

    def __init__(self, inner):
        self.inner, self.reads = inner, []
        self.config, self.block = inner.config, inner.block

    def __contains__(self, name):
        return name in self.inner

    def is_fp8(self, name):
        return self.inner.is_fp8(name)

    def get(self, name):
        self.reads.append(name)
        return self.inner.get(name)


def _model_with(names_shapes):
    inits = []
    for name, shape in names_shapes:
        v = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))
        inits.append(v)
    graph = ir.Graph([], [], nodes=[], initializers=inits, opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


def test_lazy_and_transformed():
    src = CountingSource(open_source("tiny"))
    cfg = src.config
    model = attach_weights(_model_with([
        ("model.layers.1.attn.w_uk", (cfg.n_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank)),
        ("model.layers.1.ffn.w_gate_up", (cfg.n_routed_experts, 2 * cfg.moe_inter_dim, cfg.dim)),
        ("model.norm.weight", (cfg.dim,)),
    ]), src)
    assert src.reads == []  # nothing read until a value is asked for
    inits = model.graph.initializers
    w_uk = inits["model.layers.1.attn.w_uk"].const_value.numpy()
    wkv_b = src.inner.get("layers.1.attn.wkv_b.weight").view(cfg.n_heads, -1, cfg.kv_lora_rank)
    np.testing.assert_array_equal(w_uk, wkv_b[:, :cfg.qk_nope_head_dim].numpy())
    gate_up = inits["model.layers.1.ffn.w_gate_up"].const_value.numpy()
    np.testing.assert_array_equal(gate_up[3, :cfg.moe_inter_dim], src.inner.get("layers.1.ffn.experts.3.w1.weight").numpy())
    np.testing.assert_array_equal(gate_up[3, cfg.moe_inter_dim:], src.inner.get("layers.1.ffn.experts.3.w3.weight").numpy())
    assert "layers.1.attn.wkv_b.weight" in src.reads


def test_shape_mismatch_is_an_error():
    src = open_source("tiny")
    model = attach_weights(_model_with([("model.norm.weight", (63,))]), src)
    with pytest.raises(CheckpointError, match="norm.weight"):
        model.graph.initializers["model.norm.weight"].const_value.numpy()


def test_fp8_source_is_dequantized(tiny_fp8_ckpt):
    src = open_source(tiny_fp8_ckpt)
    cfg = src.config
    model = attach_weights(_model_with([("model.layers.0.attn.wq_b.weight", (cfg.n_heads * cfg.qk_head_dim, cfg.q_lora_rank))]), src)
    w = model.graph.initializers["model.layers.0.attn.wq_b.weight"].const_value.numpy()
    assert w.dtype == np.float32
    from dsv3_export.core.fp8 import dequantize_blocks
    expect = dequantize_blocks(src.get("layers.0.attn.wq_b.weight"), src.get("layers.0.attn.wq_b.scale"))
    np.testing.assert_array_equal(w, expect.numpy())
