"""The quantize pass on the tiny model's main graph: every precision and graph form runs in ONNX
Runtime and equals the reference emulating it (exporter.quant_numerics.emulate); weights leave the graph
quantized; the policy's patterns are obeyed. Tiny's dims (64, 48, 40, 32) are all partial blocks."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from dsv3_export.exporter import load_reference, open_source
from dsv3_export.exporter.export import export_main, meta_model
from dsv3_export.exporter.passes.attach_weights import attach_weights
from dsv3_export.exporter.passes.cleanup import cleanup
from dsv3_export.exporter.passes.plugin_attrs import plugin_attrs
from dsv3_export.exporter.passes.quantize import quantize
from dsv3_export.exporter.precision_policy import Policy
from dsv3_export.exporter.quant_numerics import emulate, is_quantized
from dsv3_export.verification.lm_eval import lm_metrics

FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


@pytest.fixture(scope="module")
def traced():
    """The tiny main graph with its (fp32) weights, serialized once; each test deserializes a copy."""
    source = open_source("tiny")
    graph = attach_weights(plugin_attrs(export_main(meta_model(source.config, has_gate_bias=True, mtp=False))), source)
    return ir.serde.serialize_model(graph), source


@pytest.fixture(scope="module")
def inputs(traced):
    cfg = traced[1].config
    ids = np.random.default_rng(0).integers(2, cfg.vocab_size, (2, 16))
    feed = {"input_ids": ids, "cache_lengths": np.zeros(2, np.int64),
            **{f"past_latent.{i}": np.zeros((2, ids.shape[1], cfg.latent_dim), np.float32) for i in range(cfg.n_layers)}}
    return ids, feed


def _quantized(traced, precision, target, keep=None):
    proto, source = traced
    policy = Policy.make(precision, keep)
    model = cleanup(quantize(ir.serde.deserialize_model(proto), source, policy, target=target))
    return model, policy


def _session(model, optimize=True):
    proto = ir.serde.serialize_model(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _emulated_logits(source, policy, ids):
    model = emulate(load_reference(source, mtp=False), source, policy)
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


# (precision, target, exact): exact = ORT runs the graph's own math (Q/DQ, integer matmuls); the others
# have kernels that quantize activations inside (MatMulNBits accuracy_level 4, QMoE), not emulated.
CASES = [("fp8", "ort", True), ("int8", "qdq", True), ("int8", "ort", False), ("int8-wo", "ort", False),
         ("int4-wo", "ort", False), ("int4-wo", "qdq", True)]


@pytest.mark.parametrize("precision,target,exact", CASES)
def test_graph_equals_emulated_reference(traced, inputs, precision, target, exact):
    ids, feed = inputs
    model, policy = _quantized(traced, precision, target, keep=["none"])  # embeddings, router, head too
    decisions = policy.decisions
    assert decisions and all(is_quantized(d) for d in decisions.values())
    # no float copy of a quantized weight is left; scales are small
    float_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                      if v.dtype in FLOATS and v.const_value is not None and not v.name.endswith("_scale"))
    assert float_bytes < 4096, float_bytes  # norms, biases, rope frequencies
    logits = _session(model, optimize=not exact).run(["logits"], feed)[0]
    want = _emulated_logits(traced[1], policy, ids)
    if exact:
        assert np.abs(logits - want).max() / np.abs(want).max() < 1e-4
    else:  # tiny is a random model whose routing amplifies any difference; still the same model
        figures = lm_metrics(want, logits)
        assert figures["cosine_mean"] > 0.99 and figures["top1_agreement"] > 0.85, figures


def test_forms_use_the_intended_operators(traced):
    ops = lambda m: {n.op_type for n in m.graph}  # noqa: E731
    fp8, _ = _quantized(traced, "fp8", "ort")
    assert {"DequantizeLinear", "QuantizeLinear", "MoEDispatchFP8"} <= ops(fp8) and "MoEDispatch" not in ops(fp8)
    assert any(f[1] == "MoEDispatchFP8" for f in fp8.functions)  # its body travels with the model
    int8, _ = _quantized(traced, "int8", "ort")
    assert {"MatMulIntegerToFloat", "QMoE"} <= ops(int8) and "MoEDispatch" not in ops(int8)
    int4, policy = _quantized(traced, "int4-wo", "ort")
    assert {"MatMulNBits", "QMoE"} <= ops(int4)
    assert policy.decisions["layers.1.ffn.w_gate_up"] == "int4 blocks of 32; QMoE"  # 128 does not divide D=64
    qdq, _ = _quantized(traced, "int4-wo", "qdq")
    assert "MoEDispatch" in ops(qdq) and not ops(qdq) & {"MatMulNBits", "QMoE", "MatMulIntegerToFloat"}
    int4_weights = [v for v in qdq.graph.initializers.values() if v.dtype == ir.DataType.INT4]
    assert len(int4_weights) > 10


def test_keep_fp_patterns_are_obeyed(traced):
    model, policy = _quantized(traced, "int8", "ort", keep=["default", "head.weight", "layers.0.*"])
    for fqn in ("layers.0.attn.wq_a.weight", "layers.0.ffn.w1.weight", "embed.weight", "head.weight",
                "layers.1.ffn.gate.weight"):
        assert policy.decisions[fqn] == "kept"
        assert "model." + fqn + "_q" not in model.graph.initializers  # (cleanup may fold a small one's Transpose)
    assert model.graph.initializers["model.head.weight"].dtype == ir.DataType.FLOAT
    assert is_quantized(policy.decisions["layers.1.attn.wq_a.weight"])
    assert "model.layers.1.attn.wq_a.weight" not in model.graph.initializers


@pytest.mark.parametrize("precision", ["int8", "int4-wo"])
def test_integer_precisions_store_the_heads_in_8_bits(traced, precision):
    """The LM heads: 8 bits weight-only, blocks of 128, whatever the body's precision (W8A8's
    activation quantization included): one MatMulNBits with bits=8 reading the head."""
    model, policy = _quantized(traced, precision, "ort")
    assert policy.decisions["head.weight"] == "int8 weight-only, blocks of 128 (LM head)"
    (node,) = [n for n in model.graph if n.op_type == "MatMulNBits" and n.inputs[1].name == "model.head.weight_q"]
    assert node.attributes["bits"].as_int() == 8 and node.attributes["block_size"].as_int() == 128
    assert "model.head.weight" not in model.graph.initializers


def test_fp32_policy_changes_nothing(traced):
    proto, source = traced
    model = ir.serde.deserialize_model(proto)
    before = [n.op_type for n in model.graph]
    assert [n.op_type for n in quantize(model, source, Policy.make("fp32")).graph] == before
