"""A stack of routed experts' weights, made and written one expert at a time.

An expert stack ([E, rows, cols]: 256 experts of 4096 x 7168 in one DeepSeek-V3 layer, 30 GB in
fp32) is the largest tensor of the model, and bigger than a small machine's memory. `ExpertStack`
is an onnx-ir tensor whose slabs (one expert each, or one piece of one) are made by a function of
their index: the saver's `tofile` makes and writes them one after the other, so building holds one
expert, never the layer. Every transformation of a stack on its way to the graph (dequantizing FP8,
quantizing, interleaving gate and up rows, transposing, cutting experts into pieces) is per expert,
so each is a stack whose slab function calls the one before it.

`numpy()` still gives the whole stack, for the small models' checks that compare it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir


class ExpertStack(ir.LazyTensor):
    """slabs x slab(i) stacked along a new first axis; `slab_shape` is every slab's shape. A
    LazyTensor whose whole value (`numpy()`, `tobytes()`) is the stack, and whose `tofile` writes it
    slab by slab."""

    __slots__ = ("count", "slab", "slab_shape")

    def __init__(self, count: int, slab: Callable[[int], np.ndarray], slab_shape: tuple[int, ...],
                 dtype: ir.DataType, name: str | None = None):
        super().__init__(self._whole, dtype=dtype, shape=ir.Shape((count, *slab_shape)), name=name)
        self.count, self.slab, self.slab_shape = count, slab, tuple(slab_shape)

    @classmethod
    def of(cls, tensor, name: str | None = None) -> ExpertStack:
        """`tensor` itself when it is an ExpertStack, else a stack over its slices (a plain tensor,
        in small test graphs: read once, when the first slab is asked for, then held)."""
        if isinstance(tensor, ExpertStack):
            return tensor
        held: list[np.ndarray] = []

        def slab(i: int) -> np.ndarray:
            if not held:
                held.append(tensor.numpy())
            return held[0][i]

        shape = tuple(int(d) for d in tensor.shape)
        return cls(shape[0], slab, shape[1:], tensor.dtype, name=name or tensor.name)

    def checked_slab(self, i: int) -> np.ndarray:
        """slab(i), C-contiguous, checked against this stack's slab shape and dtype."""
        a = np.ascontiguousarray(self.slab(i))
        if a.shape != self.slab_shape:
            raise ValueError(f"{self.name}: expert slab {i} has shape {list(a.shape)}, expected {list(self.slab_shape)}")
        if a.dtype != self.dtype.numpy():
            raise ValueError(f"{self.name}: expert slab {i} is {a.dtype}, expected {self.dtype.numpy()}")
        return a

    def _whole(self) -> ir.Tensor:
        out = np.empty((self.count, *self.slab_shape), self.dtype.numpy())
        for i in range(self.count):
            out[i] = self.checked_slab(i)
        return ir.Tensor(out, dtype=self.dtype, name=self.name)

    def tofile(self, file) -> None:
        """One slab at a time: the saver never holds more than one expert."""
        for i in range(self.count):
            file.write(_raw(self.dtype, self.checked_slab(i)))

    def __repr__(self) -> str:
        return f"{self._repr_base()}(count={self.count}, name={self.name!r})"


def _raw(dtype: ir.DataType, a: np.ndarray):
    """A slab's bytes as ONNX stores them (4-bit values two per byte, low nibble first); the
    slab's own memory where it needs no packing."""
    if dtype.bitwidth == 4:
        return ir.Tensor(a, dtype=dtype).tobytes()
    return a.reshape(-1).view(np.uint8).data
