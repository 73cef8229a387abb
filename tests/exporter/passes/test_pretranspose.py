"""exporter/passes/pretranspose.py: a weight read only through a Transpose is stored transposed,
the graph computes the same values bit for bit, and weights with other readers are left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from dsv3_export.exporter.passes.pretranspose import pretranspose


def _model():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3)).astype(np.float32)  # read only through its Transpose
    v = rng.standard_normal((3, 5)).astype(np.float32)  # also read as it is
    u = rng.standard_normal((2, 3, 4)).astype(np.float32)  # a 3-D permutation, as in the MLA products
    nodes = [
        onnx.helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
        onnx.helper.make_node("MatMul", ["x", "Wt"], ["y"]),
        onnx.helper.make_node("Transpose", ["V"], ["Vt"], perm=[1, 0]),
        onnx.helper.make_node("Add", ["Vt", "Vt"], ["z"]),
        onnx.helper.make_node("Identity", ["V"], ["v"]),
        onnx.helper.make_node("Transpose", ["U"], ["Ut"], perm=[2, 0, 1]),
        onnx.helper.make_node("Identity", ["Ut"], ["u"]),
    ]
    out = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("y", "z", "v", "u")]
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
                                   out, [onnx.numpy_helper.from_array(a, n) for a, n in ((w, "W"), (v, "V"), (u, "U"))])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=9)


def _run(model: onnx.ModelProto) -> list[np.ndarray]:
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_transposed_weights_are_stored_transposed():
    proto = _model()
    before = _run(proto)
    model = pretranspose(ir.serde.deserialize_model(proto))
    inits = model.graph.initializers
    assert set(inits) == {"W.T", "V", "U.T"} and list(inits["U.T"].shape) == [4, 2, 3]
    transposes = [n for n in model.graph if n.op_type == "Transpose"]
    assert [n.inputs[0].name for n in transposes] == ["V"]  # V has another reader: both layouts would be stored
    after = _run(ir.serde.serialize_model(model))
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_the_weight_is_read_only_when_saved():
    reads = []
    w = ir.Value(name="W", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4, 2]),
                 const_value=ir.LazyTensor(lambda: reads.append(1) or ir.tensor(np.ones((4, 2), np.float32)),
                                           dtype=ir.DataType.FLOAT, shape=ir.Shape([4, 2])))
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 2]))
    t = ir.node("Transpose", [w], attributes={"perm": [1, 0]})
    mm = ir.node("MatMul", [x, t.outputs[0]])
    mm.outputs[0].name = "y"
    graph = ir.Graph([x], [mm.outputs[0]], nodes=[t, mm], initializers=[w], opset_imports={"": 17})
    model = pretranspose(ir.Model(graph, ir_version=9))
    assert not reads  # lazily: the checkpoint is read once, by the saver
    assert model.graph.initializers["W.T"].const_value.numpy().shape == (2, 4) and reads == [1]
