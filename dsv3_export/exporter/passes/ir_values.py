"""What the rewrite rules ask of an onnx-ir value: its constant contents, a comparison with an
expected constant, its static shape."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's contents when it is a constant (an initializer or a Constant's output), else None."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else tensor.numpy()


def const_is(value: ir.Value, expected) -> bool:
    got = const_array(value)
    return got is not None and got.shape == np.shape(expected) and bool(np.all(got == expected))


def dims(value: ir.Value) -> tuple | None:
    return None if value.shape is None else tuple(value.shape)
