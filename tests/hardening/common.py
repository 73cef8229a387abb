"""Helpers of the hardening tests: mutated copies of the tiny checkpoints, the CLI as users run it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from dsv3_export.cli.main import main

WEIGHTS = "model.safetensors"


def copy_ckpt(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def edit_tensors(d: Path, fn, file: str = WEIGHTS) -> None:
    t = load_file(str(d / file))
    fn(t)
    save_file(t, str(d / file), metadata={"format": "pt"})


def edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


DELETE = object()


def inspect(path) -> object:
    return CliRunner().invoke(main, ["inspect", str(path)])
