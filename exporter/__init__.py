"""dsv3-export: DeepSeek-V3 architecture checkpoints to verified ONNX Runtime / TensorRT engines.

Heavy modules (torch, onnx) are imported inside the functions so `import exporter` and the CLI stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointError, ConfigError, ExportError

if TYPE_CHECKING:
    import torch

__all__ = ["build", "load_reference", "open_source", "ExportError", "ConfigError", "CheckpointError"]


DEMO = "demo"  # the embedded trained model: the default source of build


def demo_path() -> Path:
    """Where the embedded demo checkpoint lives (exporter/data/demo, shipped as package data;
    trained by tools/train_demo.py)."""
    return Path(__file__).resolve().parent / "data" / "demo"


def open_source(source: str | Path, *, seed: int = 0):
    """A weight source: a checkpoint directory, "demo" (the embedded trained model), or a preset
    name (seeded random weights; `seed` applies to these only)."""
    from .checkpoint import Checkpoint
    from .config import PRESETS, preset
    from .weights import RandomWeights

    if isinstance(source, str) and source == DEMO:
        path = demo_path()
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: the embedded demo model is missing from this install; reinstall "
                                  "dsv3-export, or give a checkpoint directory or a preset (e.g. tiny)")
        return Checkpoint.open(path)
    if isinstance(source, str) and source in PRESETS:
        return RandomWeights(preset(source), seed=seed)
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{source}: no such checkpoint directory or preset (presets: {', '.join(PRESETS)})")
    return Checkpoint.open(path)


def load_reference(source, *, dtype: "torch.dtype | None" = None, mla: str = "absorbed", mtp: bool = True,
                   seed: int = 0):
    """The PyTorch reference model for a checkpoint dir, a preset name, or an open weight source."""
    import torch

    from .model import Transformer
    from .weights import load_weights

    src = open_source(source, seed=seed) if isinstance(source, (str, Path)) else source
    model = Transformer(src.config, dtype=dtype or torch.float32, mla=mla,
                        has_gate_bias=_has_gate_bias(src), mtp=mtp and src.has_mtp)
    with torch.no_grad():
        load_weights(model, src)
    return model.eval()


def _has_gate_bias(src) -> bool:
    cfg = src.config
    first_moe = cfg.n_dense_layers
    return first_moe < cfg.n_layers and f"layers.{first_moe}.ffn.gate.bias" in src


def build(source=DEMO, out="build", *, precision: str = "fp32", backend: str = "ort", mla: str = "absorbed",
          mtp: bool = True, verify: bool = True, force: bool = False, seed: int = 0, reporter=None,
          trt_options: dict | None = None, keep_fp=None) -> Path:
    """Checkpoint dir or preset -> a verified engine directory (see exporter/pipeline.py); returns it.
    `trt_options` (backend "trt"): engines.trt.TrtOptions fields, e.g. {"max_batch": 4, "max_seq_len": 8192}.
    `keep_fp`: patterns of weights left in high precision (exporter/precision.py, docs/precision.md)."""
    from .pipeline import build as run

    run(source, out, precision=precision, backend=backend, mla=mla, mtp=mtp, verify=verify, force=force,
        seed=seed, reporter=reporter, trt_options=trt_options, keep_fp=keep_fp)
    return Path(out)
