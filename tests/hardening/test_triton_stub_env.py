"""The python backend's environment (numpy<2 for Triton's stub) from a virtualenv: it sees the
virtualenv's packages, and a broken cached one is detected and rebuilt."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dsv3_export.core.errors import ExportError
from dsv3_export.deploy import tritonserver


def test_a_broken_cached_environment_is_rebuilt_and_sees_our_packages(tmp_path, monkeypatch):
    try:
        inst = tritonserver.find_tritonserver()
    except ExportError as e:
        pytest.skip(f"no tritonserver binary here: {e}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(tritonserver.ENV_PYTHON, raising=False)
    cached = tritonserver._default_env_path()
    # What older versions left from a virtualenv: an environment that cannot import our packages.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(cached)], check=True, timeout=120)
    lines: list[str] = []
    bindir = tritonserver.stub_environment(tritonserver.server_environment(inst), numpy1=True, log=lines.append)
    assert bindir == cached / "bin" and any("rebuilding" in line for line in lines), lines
    probe = "import numpy, onnxruntime, tokenizers, dsv3_export.deploy.llm; print(numpy.__version__)"
    done = subprocess.run([str(bindir / "python3"), "-c", probe], capture_output=True, text=True, timeout=120,
                          env=tritonserver.server_environment(inst))
    assert done.returncode == 0 and done.stdout.startswith("1."), done.stderr[-1000:]
