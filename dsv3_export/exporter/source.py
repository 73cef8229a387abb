"""Weight sources and the reference built from them: a checkpoint directory, the embedded demo
model, or a preset's seeded random weights."""

from __future__ import annotations

from pathlib import Path

import torch

import dsv3_export.exporter.hub as hub
from dsv3_export.core.config import PRESETS, check_unambiguous, preset
from dsv3_export.core.errors import CheckpointError
from dsv3_export.exporter.checkpoint import Checkpoint
from dsv3_export.exporter.model import Transformer
from dsv3_export.exporter.weights import RandomWeights, load_weights

DEMO = "demo"  # the embedded trained model: the default source of build and inspect


def demo_path() -> Path:
    """Where the embedded demo checkpoint lives (exporter/data/demo, shipped as package data;
    trained by tools/train_demo.py)."""
    return Path(__file__).resolve().parent / "data" / "demo"


def open_source(source: str | Path, *, seed: int = 0, revision: str | None = None):
    """A weight source: a checkpoint directory, a Hugging Face id ORG/NAME (at `revision`; the
    local cache first, exporter.hub), "demo" (the embedded trained model), or a preset name (seeded
    random weights; `seed` applies to these only). A bare name that is also a folder here is
    refused (core.config.check_unambiguous)."""
    check_unambiguous(source, (DEMO, *PRESETS))
    if hub.is_hub_id(source):
        ckpt = Checkpoint.open(hub.resolve(source, revision))
        ckpt.hub = {"id": source, "revision": revision or "main", "commit": ckpt.path.name}
        return ckpt
    if revision is not None:
        raise CheckpointError(f"--revision {revision}: for a Hugging Face id (ORG/NAME), not {source}")
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


def has_gate_bias(src) -> bool:
    """Whether the source's MoE gates carry the auxiliary-loss-free correction bias (read from its
    first MoE layer; a model without MoE layers has none)."""
    cfg = src.config
    first_moe = cfg.n_dense_layers
    return first_moe < cfg.n_layers and f"layers.{first_moe}.ffn.gate.bias" in src


def load_reference(source, *, dtype: torch.dtype | None = None, mla: str = "absorbed", mtp: bool = True,
                   seed: int = 0) -> Transformer:
    """The PyTorch reference model for a checkpoint dir, a preset name, or an open weight source."""
    src = open_source(source, seed=seed) if isinstance(source, (str, Path)) else source
    model = Transformer(src.config, dtype=dtype or torch.float32, mla=mla,
                        has_gate_bias=has_gate_bias(src), mtp=mtp and src.has_mtp)
    with torch.no_grad():
        load_weights(model, src)
    return model.eval()
