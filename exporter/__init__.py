"""dsv3-export's Python API: `build`, `load_reference`, `open_source` (engines.load runs a build).

The package itself is checkpoint -> PyTorch reference -> ONNX (docs/design.md, "Layout"). This
facade is the one module above every layer: `build` reaches the build pipeline (pipeline.build)
lazily, and the rest lazily too, so that `import exporter.names` does not load torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import CheckpointError, ConfigError, ExportError

if TYPE_CHECKING:
    import torch

__all__ = ["build", "load_reference", "open_source", "demo_path", "ExportError", "ConfigError", "CheckpointError"]


def demo_path() -> Path:
    """Where the embedded demo checkpoint lives (see exporter.source.demo_path)."""
    from exporter.source import demo_path as path

    return path()


def open_source(source: str | Path, *, seed: int = 0):
    """A weight source: a checkpoint directory, "demo", or a preset name (exporter.source.open_source)."""
    from exporter.source import open_source as open_

    return open_(source, seed=seed)


def load_reference(source, *, dtype: "torch.dtype | None" = None, mla: str = "absorbed", mtp: bool = True,
                   seed: int = 0):
    """The PyTorch reference model for a checkpoint dir, a preset name, or an open weight source."""
    from exporter.source import load_reference as load

    return load(source, dtype=dtype, mla=mla, mtp=mtp, seed=seed)


def build(source="demo", out="build", *, precision: str = "fp32", backend: str = "ort", mla: str = "absorbed",
          mtp: bool = True, verify: bool = True, force: bool = False, seed: int = 0, reporter=None,
          trt_options: dict | None = None, keep_fp=None) -> Path:
    """Checkpoint dir or preset -> a verified engine directory (see pipeline.build); returns it.
    `trt_options` (backend "trt"): engines.trt.TrtOptions fields, e.g. {"max_batch": 4, "max_seq_len": 8192}.
    `keep_fp`: patterns of weights left in high precision (exporter.precision_policy, docs/precision.md)."""
    from pipeline.build import build as run

    run(source, out, precision=precision, backend=backend, mla=mla, mtp=mtp, verify=verify, force=force,
        seed=seed, reporter=reporter, trt_options=trt_options, keep_fp=keep_fp)
    return Path(out)
