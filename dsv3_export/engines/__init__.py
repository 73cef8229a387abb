"""Engines: build (engines.ort, engines.trt) and run (engines.runtime) a build directory.

Import-light: numpy, onnxruntime and tokenizers are imported when an engine is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsv3_export.engines.runtime import Engine

__all__ = ["load"]


def load(build_dir: str | Path, *, backend: str | None = None, **options) -> "Engine":
    """The runnable engine of a build directory (see engines.runtime.Engine for `options`:
    providers, threads, check_files). Every file is checked against manifest.json's sha256 first."""
    from dsv3_export.engines.runtime import Engine

    return Engine(build_dir, backend=backend, **options)
