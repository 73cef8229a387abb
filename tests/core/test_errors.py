"""core/errors.py: allocation failures recognized from what numpy, torch and ONNX Runtime raise."""

import numpy as np
import pytest
import torch

from dsv3_export.core.errors import allocation_failure


@pytest.mark.parametrize("allocate", [lambda: np.empty(1 << 46, np.float32), lambda: torch.empty(1 << 46)],
                         ids=["numpy", "torch"])
def test_a_real_allocation_failure_is_one_line_with_its_bytes(allocate):
    """256 TiB: more than a process's address space, so the allocation fails for real."""
    with pytest.raises(Exception) as info:
        allocate()
    why = allocation_failure(info.value)
    assert why is not None and "\n" not in why
    assert "256" in why or "281474976710656" in why  # the bytes asked for


def test_other_errors_are_not_allocation_failures():
    assert allocation_failure(RuntimeError("shape mismatch")) is None
    assert allocation_failure(ValueError("not enough memory")) is None  # only MemoryError / RuntimeError
