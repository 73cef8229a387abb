"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    """A script of tools/ as a module (tools/ is scripts, not a package)."""
    path = ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel_max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|: the figure every parity test states its tolerance in."""
    return ((a - b).abs().max() / a.abs().max()).item()


def assert_clean_error(result, *needles, one_line: bool = True):
    """A CLI result that failed as users should see it: exit 1, an `error:` line naming the culprit,
    no traceback (progress output may precede it where one_line is False)."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output and lines[-1].startswith("error: "), result.output
    if one_line:
        assert len(lines) == 1, result.output
    for n in needles:
        assert n in lines[-1], lines[-1]
