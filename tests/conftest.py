"""Shared fixtures: tiny seeded checkpoints written once per test session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The tiny preset as a Hugging Face-layout fp32 checkpoint, with MTP layer and tokenizer."""
    from exporter.synth import make_checkpoint

    return make_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_fp8_ckpt(tmp_path_factory):
    from exporter.synth import make_checkpoint

    return make_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny-fp8", fp8=True)


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory):
    """The tiny preset built once per session (verify off). Tests that write into a build copy it."""
    from exporter.pipeline import build

    out = tmp_path_factory.getbasetemp() / "tiny-build"
    build("tiny", out, verify=False, force=True)
    return out


def load_tool(name: str):
    """A script of tools/ as a module (tools/ is scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
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
