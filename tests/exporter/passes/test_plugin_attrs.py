import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch

from dsv3_export.exporter.passes.plugin_attrs import plugin_attrs
from dsv3_export.plugins.latent_attention.reference import latent_attention


def _bare_latent_attention_model():
    """A graph with one dsv3 node as the tracer leaves it before the pass: no body, no plugin attrs."""
    q = ir.Value(name="q", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", "S", 2, 12]))
    lat = ir.Value(name="latent", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", "T", 12]))
    lengths = ir.Value(name="cache_lengths", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["B"]))
    node = ir.Node("dsv3", "LatentAttention", [q, lat, lengths], attributes=[ir.AttrFloat32("scale", 0.5), ir.AttrInt64("kv_lora_rank", 8)])
    node.outputs[0].name = "o_lat"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    node.outputs[0].shape = ir.Shape(["B", "S", 2, 8])
    graph = ir.Graph([q, lat, lengths], [node.outputs[0]], nodes=[node], opset_imports={"": 23}, name="g")
    return ir.Model(graph, ir_version=10)


def test_adds_attributes_function_and_opset():
    model = plugin_attrs(_bare_latent_attention_model())
    node = next(iter(model.graph))
    assert node.attributes["plugin_namespace"].value == "dsv3"
    assert node.attributes["plugin_version"].value == "1"
    assert ("dsv3", "LatentAttention", "") in model.functions
    assert model.opset_imports["dsv3"] == 1
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    q, lat = np.random.rand(1, 3, 2, 12).astype(np.float32), np.random.rand(1, 5, 12).astype(np.float32)
    lengths = np.array([1], np.int64)  # 1 cached row, 3 new, 1 more buffer row hidden
    out = sess.run(None, {"q": q, "latent": lat, "cache_lengths": lengths})[0]
    ref = latent_attention(torch.from_numpy(q), torch.from_numpy(lat), 0.5, 8, torch.from_numpy(lengths)).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_only_used_bodies_are_attached():
    model = plugin_attrs(_bare_latent_attention_model())
    assert [f[1] for f in model.functions] == ["LatentAttention"]
