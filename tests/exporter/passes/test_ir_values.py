"""exporter.passes.ir_values: constants and shapes of onnx-ir values, as the rewrite rules read them."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from dsv3_export.exporter.passes.ir_values import const_array, const_is, dims


def test_constants_and_shapes():
    c = ir.Value(name="c", const_value=ir.tensor(np.array([1, 2], np.int64)), shape=ir.Shape([2]))
    x = ir.Value(name="x", shape=ir.Shape(["batch", 4]))
    assert np.array_equal(const_array(c), [1, 2]) and const_array(x) is None and const_array(None) is None
    assert const_is(c, [1, 2]) and not const_is(c, [1, 3]) and not const_is(c, [[1, 2]]) and not const_is(x, 0)
    assert dims(x) == (ir.SymbolicDim("batch"), 4) and dims(ir.Value(name="y")) is None
