"""The build the deploy tests write repositories for."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def pipeline_build(staged_demo_build):
    """The demo model as 2 pipeline stages (tests/conftest.py: staged_demo_build)."""
    return staged_demo_build
