"""Checkpoint -> PyTorch reference -> ONNX (docs/design.md, "Layout").

`load_reference`, `open_source` and `demo_path` are re-exported lazily, so that
`import dsv3_export.exporter.names` does not load torch. The whole Python API is `dsv3_export`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dsv3_export.core.errors import CheckpointError, ConfigError, ExportError

if TYPE_CHECKING:
    import torch

__all__ = ["load_reference", "open_source", "demo_path", "ExportError", "ConfigError", "CheckpointError"]


def demo_path() -> Path:
    """Where the embedded demo checkpoint lives (see exporter.source.demo_path)."""
    from dsv3_export.exporter.source import demo_path as path

    return path()


def open_source(source: str | Path, *, seed: int = 0, revision: str | None = None):
    """A weight source: a checkpoint directory, a Hugging Face id, "demo", or a preset name
    (exporter.source.open_source)."""
    from dsv3_export.exporter.source import open_source as open_

    return open_(source, seed=seed, revision=revision)


def load_reference(source, *, dtype: "torch.dtype | None" = None, mla: str = "absorbed", mtp: bool = True,
                   seed: int = 0):
    """The PyTorch reference model for a checkpoint dir, a preset name, or an open weight source."""
    from dsv3_export.exporter.source import load_reference as load

    return load(source, dtype=dtype, mla=mla, mtp=mtp, seed=seed)
