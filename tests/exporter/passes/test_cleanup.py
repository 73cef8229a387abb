import numpy as np
import onnx_ir as ir

from dsv3_export.exporter.passes.cleanup import cleanup


def test_removes_dead_code_folds_small_constants_keeps_custom_nodes():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4]))
    big = ir.Value(name="big", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4, 4096]),
                   const_value=ir.LazyTensor(lambda: (_ for _ in ()).throw(AssertionError("weight read")),
                                             dtype=ir.DataType.FLOAT, shape=ir.Shape([4, 4096])))
    two = ir.Value(name="two", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]),
                   const_value=ir.tensor(np.array(2.0, np.float32)))
    four = ir.node("Add", [two, two])  # foldable: small constants
    scaled = ir.node("Mul", [x, four.outputs[0]])
    dead = ir.node("Neg", [x])  # no consumer
    t_big = ir.node("Transpose", [big], attributes={"perm": [1, 0]})  # not foldable: would read a weight
    mm = ir.node("MatMul", [scaled.outputs[0], big])
    custom = ir.Node("dsv3", "Whatever", [mm.outputs[0]])
    out = custom.outputs[0]
    out.name = "y"
    out2 = t_big.outputs[0]
    out2.name = "z"
    graph = ir.Graph([x], [out, out2], nodes=[four, scaled, dead, t_big, mm, custom], initializers=[big, two],
                     opset_imports={"": 23, "dsv3": 1})
    model = cleanup(ir.Model(graph, ir_version=10))
    ops = [n.op_type for n in model.graph]
    assert "Neg" not in ops and "Add" not in ops  # dead node gone, small constant folded
    assert "Transpose" in ops and "Whatever" in ops  # weight untouched, custom node kept
