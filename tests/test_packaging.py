"""What `pip install` puts into site-packages: one import name, `dsv3_export`, and nothing that a
folder of the user's (or another package's `core/`, `pipeline/`, ...) can shadow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import ROOT

PKG = "dsv3_export"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The project's wheel, built from a copy of the sources (setuptools writes build/ and
    *.egg-info next to the sources it builds)."""
    pytest.importorskip("setuptools", minversion="68")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / PKG, src / PKG, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return next(out.glob("*.whl"))


def test_the_wheel_installs_one_top_level_name(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
        info = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert z.read(info).decode().split() == [PKG]
        entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert f"dsv3-export = {PKG}.cli.main:main" in z.read(entry).decode()
    assert tops == {PKG}
    # the package data ships: the embedded demo model and the Triton model files
    assert f"{PKG}/exporter/data/demo/config.json" in names and f"{PKG}/deploy/triton_models/dsv3.py" in names


def test_folders_named_like_our_stages_do_not_shadow_us(tmp_path):
    """A project folder with its own core/, pipeline/, engines/ (the names the old layout
    installed at top level): our modules still import, and the CLI runs, from there."""
    for name in ("core", "pipeline", "engines", "exporter", "server", "deploy", "cli"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('not dsv3-export')\n")
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(ROOT)}
    code = "import dsv3_export.pipeline.build, dsv3_export.deploy.llm, dsv3_export.server; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    done = subprocess.run([sys.executable, "-m", f"{PKG}.cli.main", "inspect", "tiny", "--json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and '"n_layers"' in done.stdout, done.stderr[-2000:]


def test_import_is_light():
    """`import dsv3_export` (the API) loads neither torch nor ONNX Runtime: they load with what uses them."""
    code = ("import sys, dsv3_export as dx; dx.BuildOptions(precision='fp8').check(); "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
