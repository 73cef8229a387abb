"""The build's output directory: never deleting or replacing what is not ours, cleaning up after
SIGTERM and after dead processes, one build per OUT, a full disk as one line (pipeline/output_dir.py)."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dsv3_export.cli.main import main
from dsv3_export.core.build_options import BuildOptions
from dsv3_export.core.errors import ExportError
from dsv3_export.pipeline import build as build_mod
from dsv3_export.pipeline.build import build
from dsv3_export.pipeline.output_dir import TMP_MARK, check_output, sweep_stale
from tests.helpers import ROOT


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def ckpt(tiny_ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, dst)
    return dst


def _snapshot(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.stat().st_size for p in path.rglob("*")}


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_out_never_is_contains_or_sits_in_the_source(ckpt, where):
    before = _snapshot(ckpt)
    out = {"same": ckpt, "inside": ckpt / "build", "contains": ckpt.parent}[where]
    r = _cli("build", ckpt, "-o", out, "--force", "--no-verify")
    assert r.exit_code == 1 and "source checkpoint" in r.output and "Traceback" not in r.output
    assert _snapshot(ckpt) == before  # nothing deleted, nothing added


def test_out_is_never_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ExportError, match="current directory"):
        check_output(Path("."), None)
    with pytest.raises(ExportError, match="current directory"):
        check_output(tmp_path.parent, None)


def test_force_replaces_only_a_build(tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    r = _cli("build", "tiny", "-o", precious, "--force", "--no-verify")
    assert r.exit_code == 1 and "not a dsv3-export build" in r.output
    assert (precious / "thesis.txt").read_text() == "years of work"


def test_stale_temporaries_of_dead_processes_are_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}"
    stale.mkdir()
    (stale / TMP_MARK).touch()
    foreign = tmp_path / f".out.tmp-{dead.pid + 1}"  # not marked as ours: left alone
    foreign.mkdir()
    alive = tmp_path / f".out.tmp-{os.getpid()}"
    alive.mkdir()
    (alive / TMP_MARK).touch()
    assert sweep_stale(tmp_path, "out") == [stale]
    assert not stale.exists() and foreign.exists() and alive.exists()


def test_one_build_at_a_time_per_out(tmp_path):
    lock = tmp_path / ".out.lock"
    fd = os.open(lock, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(ExportError, match="another build to this directory is running"):
            build("tiny", tmp_path / "out", BuildOptions(verify=False))
    finally:
        os.close(fd)
    assert not (tmp_path / "out").exists()


def test_an_out_that_appears_meanwhile_is_not_replaced(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = build_mod.write_tokenizer

    def sneaky(*args):
        out.mkdir()
        (out / "manifest.json").write_text("{}")  # another build finished first
        return real(*args)

    monkeypatch.setattr(build_mod, "write_tokenizer", sneaky)
    with pytest.raises(ExportError, match="appeared while building"):
        build("tiny", out, BuildOptions(verify=False, mtp=False))
    assert (out / "manifest.json").read_text() == "{}"
    assert not list(tmp_path.glob(".out.*"))


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(build_mod, "write_tokenizer", full)
    r = _cli("build", "tiny", "-o", tmp_path / "out", "--no-verify", "--no-mtp")
    assert r.exit_code == 1 and "No space left on device" in r.output and "Traceback" not in r.output
    assert not list(tmp_path.iterdir())


def test_sigterm_mid_build_leaves_no_temporary(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "dsv3_export.cli.main", "build", "tiny", "-o", str(out), "--no-verify"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the build ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(60) != 0
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem that fills up: a tmpfs of `size` mounted here (root only)."""
    mounted = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk-{size}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip() or done.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


@pytest.mark.parametrize("size,last", [
    ("600k", "error: {disk}/out: the fp32 build needs about"),  # the pre-flight sees it will not fit
    ("2m", "error: {disk}: No space left on device while writing out; nothing was left behind: free some space and "
           "build again"),  # it fits the estimate (1.5 MB), then the build (2.3 MB) fills the disk as it is written
])
def test_a_disk_that_fills_is_one_line_and_leaves_nothing(small_disk, size, last):
    """Too small for the estimate: refused before writing; big enough for it but not for the graphs
    and weights as they are written: the one 'no space' line. Nothing is left either way."""
    disk = small_disk(size)
    proc = subprocess.run([sys.executable, "-m", "dsv3_export.cli.main", "build", "tiny", "-o", str(disk / "out"),
                           "--no-verify"], capture_output=True, text=True, timeout=600, cwd=disk,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(last.format(disk=disk)), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not list(disk.iterdir())
