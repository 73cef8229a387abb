"""Shared fixtures: tiny seeded checkpoints written once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The tiny preset as a Hugging Face-layout fp32 checkpoint, with MTP layer and tokenizer."""
    from dsv3_export.exporter.checkpoint_writer import make_checkpoint

    return make_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_fp8_ckpt(tmp_path_factory):
    from dsv3_export.exporter.checkpoint_writer import make_checkpoint

    return make_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny-fp8", fp8=True)


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory):
    """The tiny preset built once per session (verify off). Tests that write into a build copy it."""
    from dsv3_export.core.build_options import BuildOptions
    from dsv3_export.pipeline.build import build

    out = tmp_path_factory.getbasetemp() / "tiny-build"
    build("tiny", out, BuildOptions(verify=False, force=True))
    return out


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory):
    """The embedded demo model built once per session (verify off)."""
    from dsv3_export.core.build_options import BuildOptions
    from dsv3_export.pipeline.build import build

    out = tmp_path_factory.getbasetemp() / "demo-build"
    build("demo", out, BuildOptions(verify=False, force=True))
    return out


@pytest.fixture(scope="session")
def staged_demo_build(tmp_path_factory):
    """The demo model built as 2 pipeline stages (`--stages 2`), verified, once per session."""
    from dsv3_export.core.build_options import BuildOptions
    from dsv3_export.pipeline.build import build

    out = tmp_path_factory.getbasetemp() / "demo-build-2-stages"
    build("demo", out, BuildOptions(stages=2, force=True))
    return out
