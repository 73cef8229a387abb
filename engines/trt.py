"""TensorRT engines. Needs TensorRT >= 10.15 and an NVIDIA GPU; everything else in the project works
without them, and asking for this backend where they are missing fails at once with one line."""

from __future__ import annotations

from exporter.errors import ExportError


def require_tensorrt():
    """The tensorrt module, or an ExportError naming what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise ExportError("--backend trt needs TensorRT >= 10.15 (pip install tensorrt on a machine with an "
                          "NVIDIA GPU); it is not installed here") from None
    major, minor = (int(p) for p in trt.__version__.split(".")[:2])
    if (major, minor) < (10, 15):
        raise ExportError(f"--backend trt needs TensorRT >= 10.15, found {trt.__version__}")
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        raise ExportError("--backend trt needs an NVIDIA GPU; none is visible (torch.cuda.is_available() is False)")
    return trt
