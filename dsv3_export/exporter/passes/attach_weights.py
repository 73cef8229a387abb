"""Give every initializer its value from the checkpoint, lazily: each tensor is made (W_UK/W_UV cut,
FP8 dequantized) only when the saver writes it, then dropped; an expert stack is made and written
one expert at a time (exporter/expert_stack.py). Peak memory is one tensor or one expert, not the
model."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from dsv3_export.core.errors import CheckpointError
from dsv3_export.exporter.expert_stack import ExpertStack
from dsv3_export.exporter.weights import expert_of, expert_tensor, is_expert_stack, source_tensor

# torch.onnx names parameters by their path from the traced wrapper module.
_PREFIX = "model."


def _loader(source, fqn: str, shape: tuple[int, ...], dtype: torch.dtype):
    def load() -> ir.Tensor:
        t = source_tensor(source, fqn, dtype)
        if hasattr(source, "release"):
            source.release()  # unmap the checkpoint files between tensors: peak memory is one tensor
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor for {fqn!r} has shape {list(t.shape)}, the graph expects {list(shape)}")
        return ir.Tensor(np.ascontiguousarray(t.numpy()), name=_PREFIX + fqn)
    return load


def expert_stack(source, fqn: str, shape: tuple[int, ...], dtype: torch.dtype, value: ir.Value) -> ExpertStack:
    """The stack [E, rows, cols] of parameter `fqn`, one expert made per slab."""
    prefix, rest = expert_of(source, fqn)
    return ExpertStack(shape[0], lambda e: expert_tensor(source, prefix, rest, e, dtype).numpy(), shape[1:],
                       value.dtype, name=value.name)


def attach_weights(model: ir.Model, source, dtype: torch.dtype = torch.float32) -> ir.Model:
    for name, value in model.graph.initializers.items():
        fqn = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
        shape = tuple(int(d) for d in value.shape)
        dt = torch.float32 if fqn.endswith((".gate.weight", ".gate.bias", "inv_freq")) else dtype
        if is_expert_stack(fqn):
            value.const_value = expert_stack(source, fqn, shape, dt, value)
            continue
        value.const_value = ir.LazyTensor(_loader(source, fqn, shape, dt), dtype=value.dtype,
                                          shape=ir.Shape(shape), name=name)
    return model
