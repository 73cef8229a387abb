"""dsv3-export: DeepSeek-V3-architecture checkpoints to verified ONNX Runtime and TensorRT engines.

The Python API, everything the `dsv3-export` command does::

    import dsv3_export as dx
    dx.build("path/to/checkpoint", "out", precision="fp8")        # or dx.build(src, out, dx.BuildOptions(...))
    engine = dx.load("out")
    engine.generate("def main():", dx.SamplingParams(max_tokens=64, temperature=0.8, min_p=0.05))
    model = dx.load_reference("path/to/checkpoint")                # the PyTorch reference

This facade sits above every layer (docs/design.md, "Layout") and imports lazily: `import
dsv3_export` loads neither torch nor ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsv3_export.core.build_options import DEFAULT_BUILD_DIR, BuildOptions
from dsv3_export.core.errors import CheckpointError, ConfigError, ExportError

if TYPE_CHECKING:
    import torch

    from dsv3_export.engines.runtime import Engine
    from dsv3_export.engines.sampling import SamplingParams  # noqa: F401

__all__ = ["build", "load", "load_reference", "open_source", "demo_path", "BuildOptions", "SamplingParams",
           "ExportError", "ConfigError", "CheckpointError"]


def build(source: str | Path = "demo", out: str | Path = DEFAULT_BUILD_DIR, options: BuildOptions | None = None, *,
          reporter=None, **changes: Any) -> Path:
    """Checkpoint dir or preset -> an engine directory, verified unless told otherwise; returns it.

    `options` (BuildOptions) and/or its fields as keywords: precision, keep_fp, backend, mla,
    moe_form, lower, mtp, verify, force, seed, stages, trt ({"max_batch": 4, ...}). Progress goes
    to `reporter` (core.progress.Reporter) and to the `dsv3_export` logger."""
    from dsv3_export.pipeline.build import build as run

    run(source, out, BuildOptions.of(options, **changes), reporter=reporter)
    return Path(out)


def load(build_dir: str | Path, *, backend: str | None = None, **options) -> "Engine":
    """The runnable engine of a build directory (engines.runtime.Engine: generate, forward, step)."""
    from dsv3_export.engines import load as load_engine

    return load_engine(build_dir, backend=backend, **options)


def load_reference(source, *, dtype: "torch.dtype | None" = None, mla: str = "absorbed", mtp: bool = True,
                   seed: int = 0):
    """The PyTorch reference model for a checkpoint dir, a preset name, or an open weight source."""
    from dsv3_export.exporter import load_reference as load_ref

    return load_ref(source, dtype=dtype, mla=mla, mtp=mtp, seed=seed)


def open_source(source: str | Path, *, seed: int = 0, revision: str | None = None):
    """A weight source: a checkpoint directory, a Hugging Face id ORG/NAME, "demo", or a preset name."""
    from dsv3_export.exporter import open_source as open_

    return open_(source, seed=seed, revision=revision)


def demo_path() -> Path:
    """Where the embedded demo checkpoint lives."""
    from dsv3_export.exporter import demo_path as path

    return path()


def __getattr__(name: str):
    if name == "SamplingParams":  # numpy-light, but still loaded only when asked for
        from dsv3_export.engines.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'dsv3_export' has no attribute {name!r}")
