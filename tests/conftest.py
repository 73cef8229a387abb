"""Shared fixtures: tiny seeded checkpoints written once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The tiny preset as a Hugging Face-layout fp32 checkpoint, with MTP layer and tokenizer."""
    from exporter.checkpoint_writer import make_checkpoint

    return make_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_fp8_ckpt(tmp_path_factory):
    from exporter.checkpoint_writer import make_checkpoint

    return make_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny-fp8", fp8=True)


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory):
    """The tiny preset built once per session (verify off). Tests that write into a build copy it."""
    from pipeline.build import build

    out = tmp_path_factory.getbasetemp() / "tiny-build"
    build("tiny", out, verify=False, force=True)
    return out


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory):
    """The embedded demo model built once per session (verify off)."""
    from pipeline.build import build

    out = tmp_path_factory.getbasetemp() / "demo-build"
    build("demo", out, verify=False, force=True)
    return out


@pytest.fixture(scope="session")
def staged_demo_build(tmp_path_factory):
    """The demo model built as 2 pipeline stages (`--stages 2`), verified, once per session."""
    from pipeline.build import build

    out = tmp_path_factory.getbasetemp() / "demo-build-2-stages"
    build("demo", out, stages=2, force=True)
    return out
